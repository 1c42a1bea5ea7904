//! CPU time and memory of processes, from /proc (Linux). Everything here is best effort: on a
//! system without /proc, or for a process that is gone, the numbers are simply absent.

use procfs::process::Process;

/// CPU seconds (user + system, all threads) a process has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = Process::new(i32::try_from(pid).ok()?).ok()?.stat().ok()?;
    Some((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64)
}

/// The CPU seconds of this process.
pub fn own_cpu_seconds() -> Option<f64> {
    cpu_seconds(std::process::id())
}

/// Resident memory now and at its peak, in MiB (VmRSS and VmHWM).
pub fn memory_mib(pid: u32) -> Option<(f64, f64)> {
    let status = Process::new(i32::try_from(pid).ok()?).ok()?.status().ok()?;
    let mib = |kib: u64| kib as f64 / 1024.0;
    Some((mib(status.vmrss?), mib(status.vmhwm?)))
}

/// CPU seconds used so far by every process named `postgres` (the server and its backends)
/// that can be seen. A backend that exits takes its time with it, which is why the
/// benchmark's connections are made before the first sample.
pub fn postgres_cpu_seconds() -> Option<f64> {
    let ticks = procfs::ticks_per_second() as f64;
    let mut total = 0.0;
    let mut seen = false;
    for process in procfs::process::all_processes().ok()?.flatten() {
        let Ok(stat) = process.stat() else {
            continue;
        };
        if stat.comm == "postgres" {
            total += (stat.utime + stat.stime) as f64 / ticks;
            seen = true;
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
    fn this_process_is_visible() {
        assert!(own_cpu_seconds().is_some());
        let (rss, peak) = memory_mib(std::process::id()).expect("memory");
        assert!(rss > 0.0 && peak >= rss, "{rss} MiB, peak {peak} MiB");
    }
}
