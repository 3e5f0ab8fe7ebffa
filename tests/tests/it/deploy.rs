//! The systemd unit and the install scripts of `deploy/`: the unit passes
//! `systemd-analyze verify`, install/uninstall put and take their files under `DESTDIR`, and the
//! Debian package installs, runs, stops on removal and purges (in a copy of this machine).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, ensure};
use weft_tests::weft_bin;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn scratch(tag: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("weft-deploy-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify_and_says_what_the_issue_asks()
-> anyhow::Result<()> {
    let unit = std::fs::read_to_string(deploy_dir().join("systemd/weft.service"))?;
    for want in [
        "Type=notify",
        "ExecStart=/usr/local/bin/weft run --config /etc/weft/weft.yaml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "StateDirectory=weft",
        "RuntimeDirectory=weft",
        "CapabilityBoundingSet=CAP_NET_ADMIN",
        "DeviceAllow=/dev/net/tun rw",
        "WatchdogSec=",
    ] {
        ensure!(
            unit.lines().any(|l| l.starts_with(want)),
            "the unit lacks {want}"
        );
    }
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    ensure!(
        analyze.is_ok_and(|o| o.status.success()),
        "systemd-analyze is missing: apt-get install systemd (scripts/test.sh installs it)"
    );
    // The same unit with ExecStart on this build's binary (verify checks the path exists).
    let dir = scratch("verify")?;
    let copy = dir.join("weft.service");
    let bin = weft_bin()?;
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/weft", &bin.display().to_string()),
    )?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let _ = std::fs::remove_dir_all(&dir);
    ensure!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    ensure!(
        !stderr.contains("weft.service"),
        "systemd-analyze verify complained:\n{stderr}"
    );
    Ok(())
}

fn script(name: &str, root: &Path, args: &[&str]) -> anyhow::Result<String> {
    let bin_dir = weft_bin()?.parent().context("target dir")?.to_path_buf();
    let out = Command::new(deploy_dir().join(name))
        .args(args)
        .env("DESTDIR", root)
        .env("BIN_DIR", &bin_dir)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "{name} failed:\n{text}");
    Ok(text)
}

#[test]
fn install_puts_binaries_unit_and_a_valid_config_in_place_and_uninstall_takes_them_and_the_conflist_away()
-> anyhow::Result<()> {
    let root = scratch("install")?;
    let text = script("install.sh", &root, &[])?;
    ensure!(text.contains("Next:"), "no next step printed:\n{text}");
    for f in [
        "usr/local/bin/weft",
        "usr/local/bin/weft-cni",
        "etc/systemd/system/weft.service",
        "etc/weft/weft.yaml",
    ] {
        ensure!(root.join(f).exists(), "{f} not installed");
    }
    // The commented default config is a valid config.
    weft_config::Config::load(&root.join("etc/weft/weft.yaml"))
        .map_err(|e| anyhow::anyhow!("the installed config does not load: {e}"))?;
    // A second install keeps an edited config.
    std::fs::write(root.join("etc/weft/weft.yaml"), "node:\n  name: edited\n")?;
    let text = script("install.sh", &root, &[])?;
    ensure!(text.contains("kept the existing"), "{text}");
    ensure!(std::fs::read_to_string(root.join("etc/weft/weft.yaml"))?.contains("edited"));

    put_conflists(&root)?;
    script("uninstall.sh", &root, &[])?;
    for f in [
        "usr/local/bin/weft",
        "usr/local/bin/weft-cni",
        "etc/systemd/system/weft.service",
    ] {
        ensure!(!root.join(f).exists(), "{f} left behind");
    }
    only_weft_conflist_gone(&root)?;
    ensure!(
        root.join("etc/weft/weft.yaml").exists(),
        "the config went without --purge"
    );
    script("uninstall.sh", &root, &["--purge"])?;
    ensure!(!root.join("etc/weft").exists(), "--purge left the config");
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

/// The Debian package's postrm under `DPKG_ROOT`: a remove takes the conflist that names
/// weft-cni and keeps the config and state; a purge takes those too; another plugin's conflist
/// stays either way.
#[test]
fn the_debian_postrm_takes_the_weft_conflist_on_remove_and_the_state_on_purge() -> anyhow::Result<()>
{
    let root = scratch("postrm")?;
    put_conflists(&root)?;
    for (rel, text) in [("etc/weft/secret", "s"), ("var/lib/weft/private.key", "k")] {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().context("parent")?)?;
        std::fs::write(p, text)?;
    }
    let postrm = |arg: &str| -> anyhow::Result<()> {
        let out = Command::new("sh")
            .arg(deploy_dir().join("debian/postrm"))
            .arg(arg)
            .env("DPKG_ROOT", &root)
            .output()?;
        ensure!(out.status.success(), "postrm {arg}: {out:?}");
        Ok(())
    };
    postrm("remove")?;
    only_weft_conflist_gone(&root)?;
    ensure!(
        root.join("etc/weft/secret").exists(),
        "a remove took the config"
    );
    postrm("purge")?;
    ensure!(!root.join("etc/weft").exists() && !root.join("var/lib/weft").exists());
    only_weft_conflist_gone(&root)?;
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

/// The conflist the daemon writes (it names weft-cni) and another plugin's, under `root`.
fn put_conflists(root: &Path) -> anyhow::Result<()> {
    let net_d = root.join("etc/cni/net.d");
    std::fs::create_dir_all(&net_d)?;
    std::fs::write(
        net_d.join("10-weft.conflist"),
        r#"{"plugins": [{"type": "ptp"}, {"type": "weft-cni"}]}"#,
    )?;
    std::fs::write(
        net_d.join("99-other.conflist"),
        r#"{"plugins": [{"type": "bridge"}]}"#,
    )?;
    Ok(())
}

/// After a removal: weft's conflist is gone (without weft-cni it would fail every pod's
/// set-up), the other plugin's stays.
fn only_weft_conflist_gone(root: &Path) -> anyhow::Result<()> {
    let net_d = root.join("etc/cni/net.d");
    ensure!(
        !net_d.join("10-weft.conflist").exists(),
        "the weft conflist stayed"
    );
    ensure!(
        net_d.join("99-other.conflist").exists(),
        "another plugin's conflist went"
    );
    Ok(())
}

fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts")
}

#[test]
fn the_daemonset_runs_the_image_scripts_image_sh_tags() -> anyhow::Result<()> {
    let out = Command::new(scripts_dir().join("image.sh"))
        .arg("--print-image")
        .output()?;
    ensure!(out.status.success(), "image.sh --print-image: {out:?}");
    let tag = String::from_utf8(out.stdout)?.trim().to_owned();
    let ds = std::fs::read_to_string(deploy_dir().join("kubernetes/daemonset.yaml"))?;
    let images: Vec<&str> = ds
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image: "))
        .collect();
    ensure!(
        images.len() == 2,
        "two containers name an image: {images:?}"
    );
    for i in images {
        ensure!(i == tag, "the DaemonSet runs {i}, image.sh tags {tag}");
    }
    Ok(())
}

/// Builds the package from this build's binaries into a scratch directory: (directory, .deb).
fn build_deb(tag: &str) -> anyhow::Result<(PathBuf, String)> {
    let bin = weft_bin()?;
    let out_dir = scratch(tag)?;
    let out = Command::new(scripts_dir().join("deb.sh"))
        .env("BIN_DIR", bin.parent().context("bin dir")?)
        .env("OUT_DIR", &out_dir)
        .output()?;
    ensure!(out.status.success(), "deb.sh: {out:?}");
    let deb = String::from_utf8(out.stdout)?.trim().to_owned();
    Ok((out_dir, deb))
}

#[test]
fn scripts_deb_sh_builds_a_package_with_the_binaries_unit_cni_plugin_and_a_private_config()
-> anyhow::Result<()> {
    let (out_dir, deb) = build_deb("deb")?;
    let list = weft::demo::lab::run(Command::new("dpkg-deb").args(["-c", &deb]))?;
    let list = String::from_utf8(list.stdout)?;
    for (mode, path) in [
        ("-rwxr-xr-x", "./usr/bin/weft"),
        ("-rwxr-xr-x", "./opt/cni/bin/weft-cni"),
        ("-rw-r--r--", "./lib/systemd/system/weft.service"),
        ("-rw-------", "./etc/weft/weft.yaml"),
        ("drwx------", "./etc/weft/"),
    ] {
        ensure!(
            list.lines()
                .any(|l| l.starts_with(mode) && l.ends_with(&format!(" {path}"))),
            "{path} ({mode}) in the package:\n{list}"
        );
    }
    let conffiles = weft::demo::lab::run(Command::new("dpkg-deb").args(["-I", &deb, "conffiles"]))?;
    ensure!(
        String::from_utf8(conffiles.stdout)?.trim() == "/etc/weft/weft.yaml",
        "the config is a conffile"
    );
    let _ = std::fs::remove_dir_all(&out_dir);
    Ok(())
}

/// The package's life on a machine, run in a lab namespace with a private mount namespace whose
/// `/etc`, `/var`, `/usr` and `/opt` are overlays (and `/run` a tmpfs), so `dpkg` works on a
/// copy of this machine and nothing lands on it. Each step prints a marker the test checks.
const PACKAGE_LIFE: &str = r#"set -eu
for d in etc var usr opt; do
    mount -t overlay weft-pkg -o "lowerdir=/$d,upperdir=$ROOT/$d,workdir=$ROOT/$d.work" "/$d"
done
mount -t tmpfs weft-pkg /run
dpkg -i "$DEB" >/dev/null
echo STEP installed
test -x /usr/bin/weft && test -x /opt/cni/bin/weft-cni
systemd-analyze verify /lib/systemd/system/weft.service
echo STEP verified
# Configured as the postinst says, then started as the unit's ExecStart does (no systemd here).
(umask 077; weft gensecret > /etc/weft/secret)
printf 'node:\n  name: pkg\n  private_address: 198.18.1.1\n  pod_cidr: 100.64.1.0/24\nmesh:\n  secret_file: /etc/weft/secret\n' > /etc/weft/weft.yaml
/usr/bin/weft run --config /etc/weft/weft.yaml 2>"$ROOT/weft.log" &
pid=$!
for _ in $(seq 200); do
    weft status >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || { cat "$ROOT/weft.log"; exit 1; }
    sleep 0.05
done
weft status >/dev/null
ip link show weft0 >/dev/null
echo STEP running
# Installed again over itself (as an upgrade does): the edited config stays as edited.
dpkg -i "$DEB" </dev/null >/dev/null
grep -q 'name: pkg' /etc/weft/weft.yaml
echo STEP reinstalled
# Removed: nothing of weft keeps running, its device is gone; config and state stay.
dpkg -r weft >/dev/null
for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
if kill -0 "$pid" 2>/dev/null; then echo "weft still runs after dpkg -r"; exit 1; fi
if ip link show weft0 >/dev/null 2>&1; then echo "weft0 left after dpkg -r"; exit 1; fi
test ! -e /usr/bin/weft && test ! -e /opt/cni/bin/weft-cni
test -f /etc/weft/weft.yaml && test -f /etc/weft/secret && test -f /var/lib/weft/private.key
echo STEP removed
# Purged: config, secret and state are gone too.
dpkg -P weft >/dev/null
test ! -e /etc/weft && test ! -e /var/lib/weft
echo STEP purged
"#;

#[test]
fn the_package_installs_runs_stops_on_removal_and_purges_its_config_and_state() -> anyhow::Result<()>
{
    let (out_dir, deb) = build_deb("deb-life")?;
    let mut lab = weft::demo::lab::Lab::new("pk")?;
    let ns = lab.add_ns("p")?;
    let peer = lab.add_ns("q")?;
    lab.link(
        (&ns, "eth0", "198.18.1.1/24"),
        (&peer, "eth0", "198.18.1.2/24"),
    )?;
    let root = lab.dir.join("machine");
    for d in ["etc", "var", "usr", "opt"] {
        std::fs::create_dir_all(root.join(d))?;
        std::fs::create_dir_all(root.join(format!("{d}.work")))?;
    }
    let out = lab
        .cmd(&ns, "unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            PACKAGE_LIFE,
        ])
        .env("ROOT", &root)
        .env("DEB", &deb)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&out_dir);
    for step in [
        "installed",
        "verified",
        "running",
        "reinstalled",
        "removed",
        "purged",
    ] {
        ensure!(
            stdout.contains(&format!("STEP {step}\n")),
            "the package's life stopped before '{step}':\n{stdout}\n{stderr}"
        );
    }
    ensure!(out.status.success(), "{stdout}\n{stderr}");
    Ok(())
}
