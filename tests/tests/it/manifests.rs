//! The Kubernetes manifests of `deploy/kubernetes` load as valid objects of their kinds
//! (k8s-openapi types, unknown fields refused) and say what the DaemonSet needs; the admission
//! policy's CEL, evaluated as the API server would, lets weft change only its own Node's key
//! annotation and NetworkUnavailable condition.

use std::path::Path;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
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
                "ServiceAccount",
                "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicyBinding"
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
            "ValidatingAdmissionPolicy" => typed::<ValidatingAdmissionPolicy>(v).and_then(|p| {
                let spec = p.spec.context("spec")?;
                ensure!(
                    spec.failure_policy.as_deref() == Some("Fail"),
                    "fail closed"
                );
                let rules = spec
                    .match_constraints
                    .and_then(|m| m.resource_rules)
                    .context("resource rules")?;
                let resources: Vec<String> = rules
                    .iter()
                    .flat_map(|r| r.resources.clone().unwrap_or_default())
                    .collect();
                ensure!(resources == ["nodes", "nodes/status"], "{resources:?}");
                Ok(())
            }),
            "ValidatingAdmissionPolicyBinding" => typed::<ValidatingAdmissionPolicyBinding>(v)
                .and_then(|b| {
                    let spec = b.spec;
                    ensure!(spec.policy_name == "weft-own-node");
                    ensure!(spec.validation_actions == ["Deny"]);
                    Ok(())
                }),
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

/// The admission policy's CEL, compiled: match conditions, variables (in order) and
/// validations with their messages.
struct Policy {
    matches: Vec<cel_interpreter::Program>,
    variables: Vec<(String, cel_interpreter::Program)>,
    validations: Vec<(cel_interpreter::Program, String)>,
}

impl Policy {
    fn load() -> anyhow::Result<Self> {
        let docs = documents()?;
        let (_, _, v) = docs
            .iter()
            .find(|(_, k, _)| k == "ValidatingAdmissionPolicy")
            .context("no ValidatingAdmissionPolicy")?;
        let compile = |e: &serde_yaml_ng::Value| -> anyhow::Result<cel_interpreter::Program> {
            let text = e["expression"].as_str().context("expression")?;
            cel_interpreter::Program::compile(text).map_err(|err| anyhow::anyhow!("{text}: {err}"))
        };
        let list = |key: &str| v["spec"][key].as_sequence().cloned().unwrap_or_default();
        Ok(Self {
            matches: list("matchConditions")
                .iter()
                .map(compile)
                .collect::<anyhow::Result<_>>()?,
            variables: list("variables")
                .iter()
                .map(|e| Ok((e["name"].as_str().context("name")?.to_owned(), compile(e)?)))
                .collect::<anyhow::Result<_>>()?,
            validations: list("validations")
                .iter()
                .map(|e| Ok((compile(e)?, e["message"].as_str().unwrap_or("").to_owned())))
                .collect::<anyhow::Result<_>>()?,
        })
    }

    /// What the API server decides for an UPDATE of `old` into `new` by `user` (with the
    /// node-name claim `claim`) on `subresource`: `Ok` admitted, `Err` the refusal's message.
    /// An expression that fails to evaluate refuses (the policy fails closed).
    fn admit(
        &self,
        user: &str,
        claim: Option<&str>,
        subresource: &str,
        old: &serde_json::Value,
        new: &serde_json::Value,
    ) -> Result<(), String> {
        let extra = match claim {
            Some(n) => serde_json::json!({"authentication.kubernetes.io/node-name": [n]}),
            None => serde_json::json!({}),
        };
        let request = serde_json::json!({"operation": "UPDATE", "subResource": subresource,
            "userInfo": {"username": user, "extra": extra}});
        let value = |v: &serde_json::Value| cel_interpreter::to_value(v).map_err(|e| e.to_string());
        let mut ctx = cel_interpreter::Context::default();
        for (name, v) in [("request", &request), ("object", new), ("oldObject", old)] {
            ctx.add_variable(name, value(v)?)
                .map_err(|e| e.to_string())?;
        }
        let run = |ctx: &cel_interpreter::Context<'_>, p: &cel_interpreter::Program| {
            p.execute(ctx)
                .map_err(|e| format!("evaluation failed: {e}"))
        };
        for m in &self.matches {
            if run(&ctx, m)? != cel_interpreter::Value::Bool(true) {
                return Ok(());
            }
        }
        let mut vars = std::collections::HashMap::new();
        for (name, p) in &self.variables {
            vars.insert(name.clone(), run(&ctx, p)?);
            ctx.add_variable_from_value("variables", vars.clone());
        }
        for (p, message) in &self.validations {
            if run(&ctx, p)? != cel_interpreter::Value::Bool(true) {
                return Err(message.clone());
            }
        }
        Ok(())
    }
}

#[test]
fn the_admission_policy_lets_weft_change_only_its_own_nodes_key_and_network_condition()
-> anyhow::Result<()> {
    const WEFT: &str = "system:serviceaccount:kube-system:weft";
    let policy = Policy::load()?;
    let node = |name: &str| {
        serde_json::json!({
            "metadata": {"name": name,
                "labels": {"topology.kubernetes.io/region": "eu"},
                "annotations": {"weft.dev/private-address": "198.18.1.1"}},
            "spec": {"podCIDRs": ["100.64.1.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.1.1"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        })
    };
    let changed = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut n = node(name);
        edit(&mut n);
        n
    };
    let key = |n: &mut serde_json::Value| {
        n["metadata"]["annotations"]["weft.dev/public-key"] = serde_json::json!("KEY");
    };
    let condition = |n: &mut serde_json::Value| {
        n["status"]["conditions"]
            .as_array_mut()
            .expect("conditions")
            .push(serde_json::json!({"type": "NetworkUnavailable", "status": "False"}));
    };
    let refused = |m: &str| -> Result<(), String> { Err(m.to_owned()) };
    let own = "weft may change only the Node its pod runs on (the token's node-name claim)";
    let only_key = "on its Node weft may change only the weft.dev/public-key annotation";
    let only_condition =
        "in its Node's status weft may change only the NetworkUnavailable condition";
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    /// What, who, the token's node, the Node changed, the subresource, the change, the verdict.
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<&'a str>,
        &'a str,
        &'a str,
        Edit,
        Result<(), String>,
    );
    let cases: Vec<Case<'_>> = vec![
        ("its key", WEFT, Some("n1"), "n1", "", Box::new(key), Ok(())),
        (
            "its condition",
            WEFT,
            Some("n1"),
            "n1",
            "status",
            Box::new(condition),
            Ok(()),
        ),
        (
            "another Node's key",
            WEFT,
            Some("n1"),
            "n2",
            "",
            Box::new(key),
            refused(own),
        ),
        (
            "another Node's condition",
            WEFT,
            Some("n1"),
            "n2",
            "status",
            Box::new(condition),
            refused(own),
        ),
        (
            "a token without a node",
            WEFT,
            None,
            "n1",
            "",
            Box::new(key),
            refused(own),
        ),
        (
            "its region label",
            WEFT,
            Some("n1"),
            "n1",
            "",
            Box::new(|n: &mut serde_json::Value| {
                n["metadata"]["labels"]["topology.kubernetes.io/region"] = serde_json::json!("us");
            }),
            refused(only_key),
        ),
        (
            "its address annotation",
            WEFT,
            Some("n1"),
            "n1",
            "",
            Box::new(|n: &mut serde_json::Value| {
                n["metadata"]["annotations"]["weft.dev/private-address"] =
                    serde_json::json!("198.18.9.9");
            }),
            refused(only_key),
        ),
        (
            "an annotation removed",
            WEFT,
            Some("n1"),
            "n1",
            "",
            Box::new(|n: &mut serde_json::Value| {
                n["metadata"]["annotations"] = serde_json::json!({});
            }),
            refused(only_key),
        ),
        (
            "a taint",
            WEFT,
            Some("n1"),
            "n1",
            "",
            Box::new(|n: &mut serde_json::Value| {
                n["spec"]["taints"] = serde_json::json!([{"key": "k", "effect": "NoSchedule"}]);
            }),
            refused(only_key),
        ),
        (
            "its podCIDRs",
            WEFT,
            Some("n1"),
            "n1",
            "",
            Box::new(|n: &mut serde_json::Value| {
                n["spec"]["podCIDRs"] = serde_json::json!(["100.64.9.0/24"]);
            }),
            refused(only_key),
        ),
        (
            "its Ready condition",
            WEFT,
            Some("n1"),
            "n1",
            "status",
            Box::new(|n: &mut serde_json::Value| {
                n["status"]["conditions"][0]["status"] = serde_json::json!("False");
            }),
            refused(only_condition),
        ),
        (
            "its addresses",
            WEFT,
            Some("n1"),
            "n1",
            "status",
            Box::new(|n: &mut serde_json::Value| {
                n["status"]["addresses"][0]["address"] = serde_json::json!("198.18.9.9");
            }),
            refused(only_condition),
        ),
        (
            "another subresource",
            WEFT,
            Some("n1"),
            "n1",
            "proxy",
            Box::new(key),
            refused("weft changes no other subresource of a Node"),
        ),
        (
            "the kubelet (not weft)",
            "system:node:n2",
            Some("n2"),
            "n1",
            "",
            Box::new(|n: &mut serde_json::Value| {
                n["metadata"]["labels"]["topology.kubernetes.io/region"] = serde_json::json!("us");
            }),
            Ok(()),
        ),
    ];
    for (what, user, claim, target, sub, edit, want) in &cases {
        let got = policy.admit(user, *claim, sub, &node(target), &changed(target, &**edit));
        ensure!(&got == want, "{what}: got {got:?}, want {want:?}");
    }
    Ok(())
}
