//! CPU time and memory of processes, from /proc (Linux). Everything here is best effort: on a
//! system without /proc, or for a process that is gone, the numbers are simply absent.

use std::fs;

/// Clock ticks per second of /proc/PID/stat times (USER_HZ, 100 on every Linux ABI).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds (user + system, all threads) a process has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_cpu_seconds(&stat)
}

/// The CPU seconds of this process.
pub fn own_cpu_seconds() -> Option<f64> {
    cpu_seconds(std::process::id())
}

/// utime + stime of a /proc/PID/stat line. The command name (field 2) may contain spaces
/// and parentheses, so fields are counted from the last `)`.
fn stat_cpu_seconds(stat: &str) -> Option<f64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_SECOND)
}

/// Resident memory now and at its peak, in MiB (VmRSS and VmHWM).
pub fn memory_mib(pid: u32) -> Option<(f64, f64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU seconds used so far by every process named `postgres` (the server and its backends)
/// that can be seen. A backend that exits takes its time with it, which is why the
/// benchmark's connections are made before the first sample.
pub fn postgres_cpu_seconds() -> Option<f64> {
    let mut total = 0.0;
    let mut seen = false;
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(comm) = fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        if comm.trim_end() == "postgres" {
            if let Some(cpu) = cpu_seconds(pid) {
                total += cpu;
                seen = true;
            }
        }
    }
    seen.then_some(total)
}

/// A snapshot of the CPU counters, taken at the start and at the end of a measured phase.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSample {
    pub broker: Option<f64>,
    pub postgres: Option<f64>,
    pub bench: Option<f64>,
}

impl CpuSample {
    pub fn take(broker_pid: Option<u32>) -> Self {
        CpuSample {
            broker: broker_pid.and_then(cpu_seconds),
            postgres: postgres_cpu_seconds(),
            bench: own_cpu_seconds(),
        }
    }

    /// CPU seconds used between `self` (earlier) and `later`.
    pub fn until(&self, later: &CpuSample) -> CpuSample {
        let diff = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        CpuSample {
            broker: diff(self.broker, later.broker),
            postgres: diff(self.postgres, later.postgres),
            bench: diff(self.bench, later.bench),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_times_after_a_name_with_spaces() {
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(stat_cpu_seconds(stat), Some(3.0));
    }

    #[test]
    fn this_process_is_visible() {
        assert!(own_cpu_seconds().is_some());
        assert!(memory_mib(std::process::id()).is_some());
    }
}
