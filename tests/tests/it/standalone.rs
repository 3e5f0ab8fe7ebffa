//! A standalone node (no Kubernetes) touches only what its config asks for: with the stock paths
//! in a VM of its own, it writes no CNI conflist unless `cni.conflist` is set. Run as root.

use anyhow::ensure;
use weft::lab::{Lab, wait_for};
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
    let st = weft::lab::run(st.args(["status", "--json"]))?;
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
