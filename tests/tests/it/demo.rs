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
