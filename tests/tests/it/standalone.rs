//! A standalone node (no Kubernetes) touches only what its config asks for: with the stock paths
//! in a VM of its own, it writes no CNI conflist unless `cni.conflist` is set. Run as root.

use anyhow::{Context as _, ensure};
use weft::demo::lab::{Lab, wait_for};
use weft_tests::weft_bin;

use crate::vm::Vm;

#[test]
fn a_standalone_node_writes_a_cni_conflist_only_when_cni_conflist_is_set() -> anyhow::Result<()> {
    let bin = weft_bin()?;
    let bin_dir = bin.parent().unwrap_or(&bin).to_path_buf();
    let mut lab = Lab::new("cf")?;
    let plain = Vm::new(&mut lab, "plain")?;
    let told = Vm::new(&mut lab, "told")?;
    lab.link(
        (&plain.ns, "eth0", "198.18.1.1/24"),
        (&told.ns, "eth0", "198.18.1.2/24"),
    )?;
    for (vm, addr, block, cni) in [
        (&plain, "198.18.1.1", 1, ""),
        (
            &told,
            "198.18.1.2",
            2,
            "cni:\n  conflist: /etc/cni/net.d/10-weft.conflist\n",
        ),
    ] {
        vm.write_etc(
            "weft/weft.yaml",
            &format!(
                "node:\n  name: {}\n  private_address: {addr}\n  pod_cidr: 100.64.{block}.0/24\n{cni}",
                vm.name
            ),
        )?;
        let log = vm.spawn(
            &mut lab,
            &[&bin_dir],
            "weft",
            &["run", "--config", "/etc/weft/weft.yaml"],
        )?;
        vm.wait_weft(&mut lab, &bin_dir, &log)?;
    }
    // The node told to write one does (so the VM's /etc shows what a node writes there)...
    let written = told.etc().join("cni/net.d/10-weft.conflist");
    wait_for(
        "the node with cni.conflist to write it",
        std::time::Duration::from_secs(10),
        || written.exists().then_some(()),
    )?;
    ensure!(
        std::fs::read_to_string(&written)?.contains("100.64.2.0/24"),
        "the conflist lacks the node's block"
    );
    // ...and the other, up with its block since before its API answered, wrote nothing there.
    let mut st = plain.enter(&lab, &[&bin_dir], "weft")?;
    let st = weft::demo::lab::run(st.args(["status", "--json"]))?;
    let st: serde_json::Value = serde_json::from_slice(&st.stdout)?;
    ensure!(
        st["node"]["pod_cidrs"] == serde_json::json!(["100.64.1.0/24"]),
        "{st}"
    );
    let cni = plain.etc().join("cni");
    ensure!(
        !cni.exists(),
        "a standalone node without cni.conflist wrote under /etc/cni: {:?}",
        std::fs::read_dir(cni.join("net.d")).map(|d| d
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect::<Vec<_>>())
    );
    for vm in [&plain, &told] {
        ensure!(
            lab.stop(&vm.name, std::time::Duration::from_secs(10))?,
            "weft on {} did not exit cleanly",
            vm.name
        );
    }
    Ok(())
}

/// The fenced code blocks of the README's section `title`, as (info string, text), with the
/// fences' indentation taken off.
fn readme_blocks(title: &str) -> anyhow::Result<Vec<(String, String)>> {
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"),
    )?;
    let start = readme
        .find(&format!("\n## {title}\n"))
        .with_context(|| format!("no README section {title:?}"))?;
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)];
    let mut out = Vec::new();
    let mut open: Option<(usize, String, String)> = None;
    for line in section.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match (open.take(), trimmed.strip_prefix("```")) {
            (None, Some(info)) => open = Some((indent, info.trim().to_owned(), String::new())),
            (Some((_, info, text)), Some(_)) => out.push((info, text)),
            (Some((ind, info, mut text)), None) => {
                text.push_str(line.get(ind..).unwrap_or("").trim_end());
                text.push('\n');
                open = Some((ind, info, text));
            }
            (None, None) => {}
        }
    }
    ensure!(open.is_none(), "an unclosed code block in {title:?}");
    Ok(out)
}

#[test]
fn the_readme_standalone_vm_walkthrough_works_as_written() -> anyhow::Result<()> {
    const TITLE: &str = "Standalone VM mesh in five minutes";
    let blocks = readme_blocks(TITLE)?;
    let block = |info: &str| -> anyhow::Result<String> {
        blocks
            .iter()
            .find(|(i, _)| i == info)
            .map(|(_, t)| t.clone())
            .with_context(|| format!("no ```{info} block in {TITLE:?}: {blocks:?}"))
    };
    let secret_step = blocks
        .iter()
        .find(|(i, t)| i == "sh" && t.contains("gensecret"))
        .map(|(_, t)| t.clone())
        .context("no gensecret step")?;
    let checks = blocks
        .iter()
        .find(|(i, t)| i == "sh" && t.contains("ping"))
        .map(|(_, t)| t.clone())
        .context("no check step")?;
    let start = "weft run --config /etc/weft/weft.yaml";
    ensure!(
        std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")
        )?
        .contains(&format!("`{start}`")),
        "the README no longer says `{start}`"
    );

    let bin = weft_bin()?;
    let bin_dir = bin.parent().unwrap_or(&bin).to_path_buf();
    let mut lab = Lab::new("wt")?;
    let sw = lab.add_ns("sw")?;
    lab.bridge(&sw, "lan")?;
    let mut vms = Vec::new();
    for name in ["vm1", "vm2", "vm3"] {
        let config = block(&format!("yaml {name}"))?;
        let parsed: serde_yaml_ng::Value = serde_yaml_ng::from_str(&config)?;
        let addr = parsed["node"]["private_address"]
            .as_str()
            .with_context(|| format!("{name}: no node.private_address"))?
            .to_owned();
        let vm = Vm::new(&mut lab, name)?;
        lab.plug((&sw, "lan"), (&vm.ns, "eth0", &format!("{addr}/24")))?;
        vm.write_etc("weft/weft.yaml", &config)?;
        vms.push(vm);
    }
    // 1. The secret, made on vm1 as printed, copied to the others.
    let made = vms[0]
        .command(&lab, &[&bin_dir], "sh")
        .args(["-c", &secret_step])
        .output()?;
    ensure!(
        made.status.success(),
        "the secret step failed: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let secret = std::fs::read_to_string(vms[0].etc().join("weft/secret"))?;
    for vm in &vms[1..] {
        vm.write_etc("weft/secret", &secret)?;
    }
    // 3. Started on each VM.
    let args: Vec<&str> = start.split_whitespace().skip(1).collect();
    for vm in &vms {
        let log = vm.spawn(&mut lab, &[&bin_dir], "weft", &args)?;
        vm.wait_weft(&mut lab, &bin_dir, &log)?;
    }
    // 4. The checks from vm1, as printed: `weft status` lists the others, each ping answers.
    for line in checks.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["weft", "status"] => {
                let listed = wait_for(
                    "vm1's weft status to list vm2 and vm3",
                    std::time::Duration::from_secs(30),
                    || {
                        let mut c = vms[0].enter(&lab, &[&bin_dir], "weft").ok()?;
                        let out = c.arg("status").output().ok()?;
                        let text = String::from_utf8_lossy(&out.stdout).into_owned();
                        (out.status.success() && text.contains("vm2") && text.contains("vm3"))
                            .then_some(text)
                    },
                )?;
                eprintln!("{listed}");
            }
            ["ping", "-c", "3", addr] => {
                weft_tests::ping(&lab, &vms[0].ns, addr, None)
                    .with_context(|| format!("{line} from vm1"))?;
            }
            _ => anyhow::bail!("a check step this test does not know: {line:?}"),
        }
    }
    // Encrypted (nothing trusted), and no CNI config on any VM.
    let mut st = vms[0].enter(&lab, &[&bin_dir], "weft")?;
    let st: serde_json::Value =
        serde_json::from_slice(&weft::demo::lab::run(st.args(["status", "--json"]))?.stdout)?;
    for p in st["peers"].as_array().context("peers")? {
        ensure!(p["path"] == "encrypted", "{p}");
    }
    for vm in &vms {
        ensure!(
            !vm.etc().join("cni").exists(),
            "{} wrote a CNI config",
            vm.name
        );
    }
    for vm in &vms {
        ensure!(
            lab.stop(&vm.name, std::time::Duration::from_secs(10))?,
            "weft on {} did not exit cleanly",
            vm.name
        );
    }
    Ok(())
}
