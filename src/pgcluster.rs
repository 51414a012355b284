//! Throwaway PostgreSQL clusters: `initdb` + `pg_ctl` on a free port in a
//! directory of their own. The one harness behind the tests, the benchmarks and
//! `meridian demo`.
//!
//! PostgreSQL refuses to run as root, so when we are root every server binary
//! runs as the `postgres` user (`runuser -u postgres --`) on a data directory
//! that user owns.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A running PostgreSQL cluster. Stopped (and its directory removed, unless
/// kept) when dropped.
pub struct PgCluster {
    bin: PathBuf,
    root: PathBuf,
    port: u16,
    keep: bool,
    stopped: bool,
}

/// Where the server binaries are: `$PG_BIN`, `initdb` on PATH, or the newest
/// `/usr/lib/postgresql/*/bin`.
pub fn find_bin_dir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("initdb");
            if candidate.exists() {
                let real = std::fs::canonicalize(&candidate).unwrap_or(candidate);
                return Ok(real.parent().unwrap().to_path_buf());
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "PostgreSQL server binaries not found: install them (apt-get install -y postgresql) \
             or set PG_BIN to the directory holding initdb and pg_ctl"
        ),
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The connection string for `database` on a local cluster at `port`.
fn url_for(port: u16, database: &str) -> String {
    format!("postgresql://postgres@127.0.0.1:{port}/{database}?sslmode=disable")
}

/// A superuser session on the `postgres` database of the cluster at `port`.
async fn admin_client(port: u16) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(&url_for(port, "postgres"), tokio_postgres::NoTls)
        .await
        .context("connecting to the PostgreSQL cluster")?;
    tokio::spawn(conn);
    Ok(client)
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl PgCluster {
    /// Creates and starts a cluster in a new temporary directory.
    pub fn start_temp() -> Result<Self> {
        let root = tempfile::Builder::new()
            .prefix("meridian-pg-")
            .tempdir()?
            .keep();
        Self::start_in(&root, false)
    }

    /// Creates (if needed) and starts a cluster under `root`. With `keep`,
    /// dropping stops the server but leaves the directory.
    pub fn start_in(root: &Path, keep: bool) -> Result<Self> {
        let bin = find_bin_dir()?;
        std::fs::create_dir_all(root)?;
        let root = std::fs::canonicalize(root)?;
        let data = root.join("data");
        let mut cluster = PgCluster {
            bin,
            root: root.clone(),
            port: free_port()?,
            keep,
            stopped: false,
        };
        if is_root() {
            // The postgres user must own the tree and reach it.
            give_to_postgres(true, &[&root])?;
            run(Command::new("chmod").arg("0755").arg(&root))?;
        }
        if !data.join("PG_VERSION").exists() {
            let mut initdb = cluster.command("initdb");
            initdb.arg("-D").arg(&data).args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]);
            run(&mut initdb).context("initdb")?;
        }
        cluster.pg_ctl_start()?;
        Ok(cluster)
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn pg_ctl_start(&mut self) -> Result<()> {
        let data = self.root.join("data");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c wal_level=logical \
             -c max_replication_slots=32 -c max_wal_senders=32 -c max_connections=200 \
             -c fsync=off -c full_page_writes=off \
             -c shared_buffers=128MB -c max_wal_size=2GB",
            self.port,
            self.root.display()
        );
        let mut c = self.command("pg_ctl");
        c.arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(self.root.join("server.log"))
            .args(["-w", "-t", "60", "-o", &opts, "start"]);
        run(&mut c).with_context(|| {
            let log = std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default();
            format!("pg_ctl start failed; server log:\n{log}")
        })?;
        self.stopped = false;
        Ok(())
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's directory (data, socket and log live under it).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A connection string for `database` as the `postgres` superuser.
    pub fn url(&self, database: &str) -> String {
        url_for(self.port, database)
    }

    /// Creates `database` (no error if it exists) and returns its URL.
    pub async fn create_database(&self, database: &str) -> Result<String> {
        let client = admin_client(self.port).await?;
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
            .await?
            .is_some();
        if !exists {
            client
                .batch_execute(&format!(
                    "CREATE DATABASE {}",
                    crate::target::sql::quote_ident(database)
                ))
                .await?;
        }
        Ok(self.url(database))
    }

    /// Turns on TLS for TCP connections, with a self-signed certificate, so
    /// that clients asking for `sslmode=require` get an encrypted session.
    pub async fn enable_ssl(&self) -> Result<()> {
        let data = self.root.join("data");
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
            .context("generating a certificate")?;
        let (crt, key) = (data.join("server.crt"), data.join("server.key"));
        std::fs::write(&crt, ck.cert.pem())?;
        std::fs::write(&key, ck.key_pair.serialize_pem())?;
        // The server refuses a key others can read.
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        if is_root() {
            give_to_postgres(false, &[&crt, &key])?;
        }
        let client = admin_client(self.port).await?;
        // Two statements: ALTER SYSTEM refuses the implicit transaction of
        // a multi-statement query.
        client.batch_execute("ALTER SYSTEM SET ssl = on").await?;
        client.batch_execute("SELECT pg_reload_conf()").await?;
        // The reload reaches the postmaster asynchronously; a new session
        // shows whether it took.
        let on = wait_for(Duration::from_secs(10), || async {
            let Ok(c) = admin_client(self.port).await else {
                return false;
            };
            c.query_one("SHOW ssl", &[])
                .await
                .is_ok_and(|r| r.get::<_, String>(0) == "on")
        })
        .await;
        if !on {
            bail!(
                "PostgreSQL did not turn ssl on; see {}",
                self.root.join("server.log").display()
            );
        }
        Ok(())
    }

    /// Stops the server immediately (as a crash would).
    pub fn kill(&mut self) -> Result<()> {
        self.stop_mode("immediate")
    }

    /// Stops the server and waits for it.
    pub fn stop(&mut self) -> Result<()> {
        self.stop_mode("fast")
    }

    fn stop_mode(&mut self, mode: &str) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        let mut c = self.command("pg_ctl");
        c.arg("-D")
            .arg(self.root.join("data"))
            .args(["-m", mode, "-w", "stop"]);
        run(&mut c)?;
        self.stopped = true;
        Ok(())
    }

    /// Starts a stopped server again on the same port.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.pg_ctl_start()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.stop_mode("immediate");
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// Makes the postgres user own `paths` (whole trees with `recursive`): the
/// server runs as that user when this process is root.
fn give_to_postgres(recursive: bool, paths: &[&Path]) -> Result<()> {
    let mut chown = Command::new("chown");
    if recursive {
        chown.arg("-R");
    }
    run(chown.arg("postgres:postgres").args(paths))
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

static SHARED: OnceLock<Mutex<Option<PgCluster>>> = OnceLock::new();

extern "C" fn stop_shared_cluster() {
    if let Some(m) = SHARED.get() {
        if let Ok(mut guard) = m.lock() {
            guard.take();
        }
    }
}

/// The cluster shared by every test in one test binary, started on first use
/// and stopped when the process exits.
pub fn shared() -> Result<SharedCluster> {
    let cell = SHARED.get_or_init(|| Mutex::new(None));
    let mut guard = cell.lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        let started = Instant::now();
        *guard = Some(PgCluster::start_temp()?);
        // SAFETY: registering a plain extern "C" function with atexit.
        unsafe { libc::atexit(stop_shared_cluster) };
        tracing::debug!("test cluster started in {:?}", started.elapsed());
    }
    let c = guard.as_ref().unwrap();
    Ok(SharedCluster { port: c.port })
}

/// A handle on the shared test cluster.
#[derive(Clone, Copy)]
pub struct SharedCluster {
    port: u16,
}

impl SharedCluster {
    pub fn url(&self, database: &str) -> String {
        url_for(self.port, database)
    }

    /// Creates a fresh database (dropping any leftover of the same name).
    pub async fn fresh_database(&self, database: &str) -> Result<String> {
        let client = admin_client(self.port).await?;
        let q = crate::target::sql::quote_ident(database);
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {q} WITH (FORCE)"))
            .await?;
        client
            .batch_execute(&format!("CREATE DATABASE {q}"))
            .await?;
        Ok(self.url(database))
    }
}

/// Waits until `f` returns true or `timeout` passes.
pub async fn wait_for<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
