//! The Kubernetes manifests of `deploy/kubernetes` load as valid objects of their kinds
//! (k8s-openapi types, unknown fields refused) and say what the DaemonSet needs.

use std::path::Path;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::de::DeserializeOwned;

/// Every document of every manifest, as (file, kind, document).
fn documents() -> anyhow::Result<Vec<(String, String, serde_yaml_ng::Value)>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v: serde_yaml_ng::Value = serde::Deserialize::deserialize(doc)?;
            let kind = v["kind"]
                .as_str()
                .with_context(|| format!("{}: a document without kind", f.display()))?;
            out.push((f.display().to_string(), kind.to_owned(), v));
        }
    }
    Ok(out)
}

/// `v` as a `T`, refusing fields `T` does not have (a typo in a manifest is an error).
fn typed<T: DeserializeOwned + serde::Serialize>(v: &serde_yaml_ng::Value) -> anyhow::Result<T> {
    let t: T = serde_yaml_ng::from_value(v.clone())?;
    let back = serde_yaml_ng::to_value(&t)?;
    let (a, b) = (serde_json::to_value(v)?, serde_json::to_value(&back)?);
    ensure!(
        a == b,
        "fields lost in the round trip (unknown or misplaced):\n{a}\nvs\n{b}"
    );
    Ok(t)
}

#[test]
fn each_manifest_is_a_valid_object_and_the_daemonset_has_what_weft_needs() -> anyhow::Result<()> {
    let docs = documents()?;
    let mut kinds: Vec<&str> = docs.iter().map(|(_, k, _)| k.as_str()).collect();
    kinds.sort_unstable();
    ensure!(
        kinds
            == [
                "ClusterRole",
                "ClusterRoleBinding",
                "ConfigMap",
                "DaemonSet",
                "ServiceAccount"
            ],
        "{kinds:?}"
    );
    for (file, kind, v) in &docs {
        let r = match kind.as_str() {
            "ServiceAccount" => typed::<ServiceAccount>(v).map(drop),
            "ClusterRole" => typed::<ClusterRole>(v).map(|r| {
                let rules = r.rules.unwrap_or_default();
                assert!(
                    rules.iter().all(|r| r
                        .resources
                        .as_ref()
                        .is_some_and(|x| x.iter().all(|x| x.starts_with("nodes")))),
                    "only nodes"
                );
                assert!(
                    !rules.iter().any(|r| r
                        .verbs
                        .iter()
                        .any(|v| v == "*" || v == "delete" || v == "create")),
                    "least rights"
                );
            }),
            "ClusterRoleBinding" => typed::<ClusterRoleBinding>(v).map(drop),
            "ConfigMap" => typed::<ConfigMap>(v).and_then(|c| {
                let text = c
                    .data
                    .unwrap_or_default()
                    .remove("weft.yaml")
                    .context("weft.yaml")?;
                let cfg = weft_config::Config::parse(&text, Path::new("weft.yaml"), "node-1")
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                ensure!(
                    cfg.kubernetes.enabled,
                    "the DaemonSet's config enables the Kubernetes source"
                );
                ensure!(
                    cfg.metrics_address.ip().is_loopback(),
                    "metrics are served on the loopback only, not to the whole network"
                );
                Ok(())
            }),
            "DaemonSet" => typed::<DaemonSet>(v).and_then(|d| {
                let spec = d.spec.template.spec.context("pod spec")?;
                ensure!(spec.host_network == Some(true), "hostNetwork");
                let c = &spec.containers[0];
                let caps = c
                    .security_context
                    .as_ref()
                    .and_then(|s| s.capabilities.as_ref())
                    .and_then(|c| c.add.clone())
                    .unwrap_or_default();
                ensure!(caps == ["NET_ADMIN"], "capabilities {caps:?}");
                let probe = c
                    .readiness_probe
                    .as_ref()
                    .and_then(|p| p.http_get.as_ref())
                    .context("readiness probe")?;
                ensure!(probe.path.as_deref() == Some("/healthz"), "probe path");
                ensure!(
                    probe.host.as_deref() == Some("127.0.0.1"),
                    "the probe asks the loopback, where the metrics listen"
                );
                let vols = spec.volumes.unwrap_or_default();
                let host = |p: &str| {
                    vols.iter()
                        .any(|v| v.host_path.as_ref().is_some_and(|h| h.path == p))
                };
                for p in [
                    "/dev/net/tun",
                    "/var/lib/weft",
                    "/etc/cni/net.d",
                    "/opt/cni/bin",
                ] {
                    ensure!(host(p), "no hostPath {p}");
                }
                let init = spec.init_containers.unwrap_or_default();
                ensure!(
                    init.iter().any(|i| i
                        .command
                        .as_ref()
                        .is_some_and(|c| c.join(" ").contains("weft-cni"))),
                    "no init container installing weft-cni"
                );
                Ok(())
            }),
            other => bail!("{file}: unexpected kind {other}"),
        };
        r.with_context(|| format!("{file}: {kind}"))?;
    }
    Ok(())
}
