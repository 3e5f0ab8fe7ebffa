//! `weft demo`, exactly as the README tells a newcomer to run it.

use std::process::Command;

use weft_tests::weft_bin;

#[test]
fn weft_demo_shows_pod_to_pod_traffic_for_every_pair_and_cleans_up() -> anyhow::Result<()> {
    weft::lab::require_root("weft demo")?;
    let out = Command::new(weft_bin()?).arg("demo").output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "weft demo failed:\n{stdout}\n{stderr}"
    );
    let replies = stdout.lines().filter(|l| l.contains(": reply in ")).count();
    assert_eq!(replies, 6, "{stdout}");
    assert_eq!(stdout.matches("$ weft status").count(), 3, "{stdout}");
    assert!(stdout.contains("done: the lab is gone"), "{stdout}");
    assert!(
        stdout.contains("every node learned the others through the mesh"),
        "{stdout}"
    );
    // In a's table: b over plaintext in its region, c over WireGuard across.
    let table_a = stdout
        .split("# on node a")
        .nth(1)
        .unwrap_or("")
        .split("$ weft status")
        .next()
        .unwrap_or("");
    let row = |peer: &str| {
        table_a
            .lines()
            .find(|l| l.starts_with(peer))
            .unwrap_or("")
            .to_owned()
    };
    for want in ["eu-west", "plaintext", "198.18.1.2:51820", "same-region"] {
        assert!(row("b ").contains(want), "b's row lacks {want}:\n{table_a}");
    }
    for want in ["us-east", "encrypted", "198.19.0.3:51820", "other-region"] {
        assert!(row("c ").contains(want), "c's row lacks {want}:\n{table_a}");
    }
    let id = stdout
        .split_whitespace()
        .skip_while(|w| *w != "lab")
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("no lab id in {stdout}"))?
        .to_owned();
    let netns = Command::new("ip").args(["netns", "list"]).output()?;
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&id),
        "namespaces of {id} left behind"
    );
    assert!(
        !std::env::temp_dir().join(format!("weft-{id}")).exists(),
        "lab directory left behind"
    );
    Ok(())
}
