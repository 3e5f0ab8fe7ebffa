//! "VMs" for the tests that follow a walk-through: a lab namespace whose processes see their own
//! `/etc`, `/var/lib` and `/run` (overlays on the host's two and a tmpfs, in a private mount
//! namespace), so a daemon run with the stock paths (`/etc/weft/weft.yaml`, `/var/lib/weft`,
//! `/run/weft/weft.sock`) keeps to its VM and nothing lands on the host. What a VM writes under
//! `/etc` shows in its upper directory, [`Vm::etc`].
//!
//! One process per VM mounts the VM ([`Vm::spawn`]); later commands enter its namespaces
//! ([`Vm::enter`]), as one would log in to the VM.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use weft::demo::lab::{Lab, wait_for};

/// One VM of the lab.
#[derive(Debug)]
pub(crate) struct Vm {
    /// Its name (the lab process and namespace name).
    pub(crate) name: String,
    /// Its network namespace.
    pub(crate) ns: String,
    /// Its overlay directories.
    root: PathBuf,
}

impl Vm {
    /// A VM called `name`: its namespace and its (empty) upper directories.
    pub(crate) fn new(lab: &mut Lab, name: &str) -> anyhow::Result<Self> {
        let ns = lab.add_ns(name)?;
        let root = lab.dir.join(format!("vm-{name}"));
        for d in ["etc", "etc.work", "varlib", "varlib.work"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        Ok(Self {
            name: name.to_owned(),
            ns,
            root,
        })
    }

    /// The directory whose content lies over the host's `/etc` in the VM: files put here before
    /// the VM runs appear under its `/etc`, and what it writes to `/etc` lands here.
    pub(crate) fn etc(&self) -> PathBuf {
        self.root.join("etc")
    }

    /// Writes `text` to `/etc/<rel>` of the VM (before it runs), mode 0600, as root would.
    pub(crate) fn write_etc(&self, rel: &str, text: &str) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.etc().join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, text)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(())
    }

    /// `program` run inside the VM: its network namespace, its own `/etc`, `/var/lib` and
    /// `/run`, and `path_dirs` first on `PATH`. Only one such command may run at a time (the
    /// overlays share their upper directories); use [`Vm::enter`] beside a running one.
    pub(crate) fn command(&self, lab: &Lab, path_dirs: &[&Path], program: &str) -> Command {
        let r = self.root.display();
        let script = format!(
            "set -e\n\
             mount -t overlay weft-vm -o lowerdir=/etc,upperdir={r}/etc,workdir={r}/etc.work /etc\n\
             mount -t overlay weft-vm -o lowerdir=/var/lib,upperdir={r}/varlib,workdir={r}/varlib.work /var/lib\n\
             mount -t tmpfs weft-vm /run\n\
             exec \"$@\""
        );
        let mut c = lab.cmd(&self.ns, "unshare");
        c.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
        ])
        .arg(program)
        .env("PATH", with_path(path_dirs));
        c
    }

    /// Starts `program args` in the VM as lab process [`Vm::name`] (logging to
    /// `<lab dir>/<name>.log`); returns the log's path.
    pub(crate) fn spawn(
        &self,
        lab: &mut Lab,
        path_dirs: &[&Path],
        program: &str,
        args: &[&str],
    ) -> anyhow::Result<PathBuf> {
        let log = lab.dir.join(format!("{}.log", self.name));
        let mut cmd = self.command(lab, path_dirs, program);
        cmd.args(args);
        lab.spawn(&self.name, cmd, Some(&log))?;
        Ok(log)
    }

    /// `program` run in the namespaces of the VM's running process (as after logging in).
    pub(crate) fn enter(
        &self,
        lab: &Lab,
        path_dirs: &[&Path],
        program: &str,
    ) -> anyhow::Result<Command> {
        let pid = lab
            .pid(&self.name)
            .with_context(|| format!("nothing runs in VM {}", self.name))?;
        let mut c = Command::new("nsenter");
        c.args(["-t", &pid.to_string(), "-m", "-n", "--"])
            .arg(program)
            .env("PATH", with_path(path_dirs));
        Ok(c)
    }

    /// Waits until `weft status` answers inside the VM (the daemon started there is up), or
    /// fails with its log when it exits first.
    pub(crate) fn wait_weft(
        &self,
        lab: &mut Lab,
        bin_dir: &Path,
        log: &Path,
    ) -> anyhow::Result<()> {
        let answered = wait_for(
            &format!("weft on {} to answer `weft status`", self.name),
            Duration::from_secs(20),
            || {
                if !lab.running(&self.name) {
                    return Some(false);
                }
                let mut st = self.enter(lab, &[bin_dir], "weft").ok()?;
                let out = st.arg("status").output().ok()?;
                out.status.success().then_some(true)
            },
        )?;
        if !answered {
            bail!(
                "weft on {} exited:\n{}",
                self.name,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        Ok(())
    }
}

/// `dirs` followed by this process's `PATH`.
fn with_path(dirs: &[&Path]) -> std::ffi::OsString {
    let rest = std::env::var_os("PATH").unwrap_or_default();
    let all: Vec<PathBuf> = dirs
        .iter()
        .map(|d| d.to_path_buf())
        .chain(std::env::split_paths(&rest))
        .collect();
    std::env::join_paths(all).unwrap_or(rest)
}
