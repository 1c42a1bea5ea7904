//! A throwaway PostgreSQL cluster for tests that stop the database. The machine's shared
//! server is never stopped: other tests use it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use uuid::Uuid;

pub struct PgCluster {
    dir: PathBuf,
    pub port: u16,
    pg_ctl: PathBuf,
    /// PostgreSQL refuses to run as root: when the tests do, the cluster runs as `postgres`.
    as_postgres: bool,
}

impl PgCluster {
    /// Initialises and starts a cluster on a free port, trusting local connections.
    pub fn start() -> PgCluster {
        let bin = pg_bin_dir();
        let dir = std::env::temp_dir().join(format!("agentbus-pg-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the cluster directory");
        let as_postgres = is_root();
        if as_postgres {
            run(
                Command::new("chown").arg("postgres:postgres").arg(&dir),
                false,
            );
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let cluster = PgCluster {
            dir,
            port,
            pg_ctl: bin.join("pg_ctl"),
            as_postgres,
        };
        run(
            Command::new(bin.join("initdb"))
                .arg("-D")
                .arg(cluster.data())
                .args(["-U", "postgres", "--auth=trust", "--no-sync"]),
            as_postgres,
        );
        cluster.resume();
        cluster
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts (or restarts) the server and waits until it accepts connections.
    pub fn resume(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        run(
            Command::new(&self.pg_ctl)
                .arg("-D")
                .arg(self.data())
                .arg("-o")
                .arg(options)
                .arg("-l")
                .arg(self.dir.join("log"))
                .args(["-w", "start"]),
            self.as_postgres,
        );
    }

    /// Stops the server at once (open connections are cut).
    pub fn halt(&self) {
        run(
            Command::new(&self.pg_ctl).arg("-D").arg(self.data()).args([
                "-m",
                "immediate",
                "-w",
                "stop",
            ]),
            self.as_postgres,
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let mut stop = Command::new(&self.pg_ctl);
        stop.arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "stop"]);
        let _ = wrap(&mut stop, self.as_postgres)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The directory of `pg_ctl` and `initdb`: on PATH, or Debian's versioned directory.
fn pg_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|d| d.join("pg_ctl").is_file() && d.join("initdb").is_file())
    {
        return dir;
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .filter(|d| Path::new(d).join("pg_ctl").is_file())
        .expect("pg_ctl and initdb: install PostgreSQL's server package")
}

fn wrap(command: &mut Command, as_postgres: bool) -> Command {
    if as_postgres {
        let mut wrapped = Command::new("runuser");
        wrapped
            .args(["-u", "postgres", "--"])
            .arg(command.get_program())
            .args(command.get_args());
        wrapped
    } else {
        let mut same = Command::new(command.get_program());
        same.args(command.get_args());
        same
    }
}

fn run(command: &mut Command, as_postgres: bool) {
    let output = wrap(command, as_postgres)
        .output()
        .expect("run a PostgreSQL tool");
    assert!(
        output.status.success(),
        "{:?} failed: {}{}",
        command,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
