//! `weft-cni`: weft's CNI chained plugin. This build answers VERSION; ADD, DEL, CHECK, STATUS
//! and GC come with the CNI work.

use std::io::Write as _;
use std::process::ExitCode;

const SUPPORTED: &str = r#"{"cniVersion":"1.1.0","supportedVersions":["1.0.0","1.1.0"]}"#;

fn main() -> ExitCode {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut out = std::io::stdout();
    if command == "VERSION" {
        let _ = writeln!(out, "{SUPPORTED}");
        return ExitCode::SUCCESS;
    }
    // CNI error code 4: invalid necessary environment variables (an unsupported command).
    let msg = serde_json::json!({
        "cniVersion": "1.1.0",
        "code": 4,
        "msg": format!("CNI_COMMAND {command:?} is not supported by this build of weft-cni"),
        "details": "only VERSION is implemented so far",
    });
    let _ = writeln!(out, "{msg}");
    ExitCode::FAILURE
}
