//! The Kubernetes manifests (`deploy/`): every overlay renders with `kubectl kustomize`, the
//! rendered objects pass `kubernetes-validate` (the schemas it bundles, strict), and they fit
//! together: the token's Secret is the one referenced, the executors reach the scheduler, the
//! autoscalers size the executor pool on `symphony_desired_gpus`, and the scheduler's config
//! is one `symphony serve` accepts.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `kubectl kustomize deploy/overlays/{overlay}`, or `None` where kubectl is missing (a
/// failure on CI, whose image has it).
fn render(overlay: &str) -> Option<String> {
    let dir = root().join("deploy/overlays").join(overlay);
    let output = match Command::new("kubectl").arg("kustomize").arg(&dir).output() {
        Ok(output) => output,
        Err(_) => {
            assert!(std::env::var_os("CI").is_none(), "kubectl is missing");
            println!("skipped: no kubectl");
            return None;
        }
    };
    assert!(
        output.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    Some(String::from_utf8(output.stdout).unwrap())
}

/// The rendered objects by `kind/name`.
fn objects(yaml: &str) -> HashMap<String, Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| {
            let value = Value::deserialize(doc).unwrap();
            let key = format!(
                "{}/{}",
                value["kind"].as_str().unwrap(),
                value["metadata"]["name"].as_str().unwrap()
            );
            (key, value)
        })
        .collect()
}

fn validate(overlay: &str, yaml: &str) {
    let validator = root().join(".venv/bin/kubernetes-validate");
    if !validator.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "no kubernetes-validate in .venv (see .ci/run)"
        );
        println!("skipped: no kubernetes-validate");
        return;
    }
    let file = std::env::temp_dir().join(format!("symphony-deploy-{overlay}-{}.yaml", std::process::id()));
    std::fs::write(&file, yaml).unwrap();
    let output = Command::new(validator).arg("--strict").arg(&file).output().unwrap();
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{overlay}: {text}");
    assert!(!text.contains("ERROR"), "{overlay}: {text}");
}

/// The object of `kind` named `name`, or generated from that name (a hash suffix).
fn named<'a>(objects: &'a HashMap<String, Value>, kind: &str, name: &str) -> &'a Value {
    let generated = |key: &str| {
        key.strip_prefix(&format!("{kind}/{name}-"))
            .is_some_and(|hash| hash.len() == 10 && hash.chars().all(|c| c.is_ascii_alphanumeric()))
    };
    let found: Vec<&Value> = objects
        .iter()
        .filter(|(key, _)| *key == &format!("{kind}/{name}") || generated(key))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(found.len(), 1, "one {kind} named {name}: {:?}", objects.keys());
    found[0]
}

fn containers(workload: &Value) -> &Vec<Value> {
    workload["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap()
}

/// `workload` mounts the Secret `secret` at the token's path in its first container.
fn mounts_token(workload: &Value, secret: &str) -> bool {
    mounts_secret(workload, secret, TOKEN_DIR)
}

/// `workload` mounts the Secret `secret` at `path` in its first container.
fn mounts_secret(workload: &Value, secret: &str, path: &str) -> bool {
    let spec = &workload["spec"]["template"]["spec"];
    let volume = spec["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|v| v["secret"]["secretName"].as_str() == Some(secret));
    let Some(name) = volume.and_then(|v| v["name"].as_str()) else {
        return false;
    };
    containers(workload)[0]["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
        .any(|m| m["name"].as_str() == Some(name) && m["mountPath"].as_str() == Some(path))
}

/// Where the scheduler and the executors find the token (`token` in it).
const TOKEN_DIR: &str = "/etc/symphony/token";

fn args(workload: &Value) -> Vec<String> {
    containers(workload)[0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_overlay_renders_validates_and_fits_together() {
    // The scheduler's config is one `symphony serve` takes, with the token where the Secret
    // is mounted (here: a file of the same name in a scratch directory).
    let toml = std::fs::read_to_string(root().join("deploy/base/serve.toml")).unwrap();
    let scratch = std::env::temp_dir().join(format!("symphony-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::write(scratch.join("token"), "t0ken\n").unwrap();
    let toml = toml.replace(&format!("{TOKEN_DIR}/token"), "token");
    let config = symphony_shards::config::ServeConfig::parse(&toml, &scratch, "deploy/base/serve.toml")
        .unwrap_or_else(|e| panic!("deploy/base/serve.toml: {e}"));
    let _ = std::fs::remove_dir_all(&scratch);
    assert_eq!(config.gpus, 0, "external executors only");
    assert_eq!(config.executor_token.as_deref(), Some("t0ken"));
    for overlay in ["daemonset", "hpa", "keda", "daemonset-tls"] {
        let Some(yaml) = render(overlay) else { return };
        validate(overlay, &yaml);
        let objects = objects(&yaml);
        let secret = named(&objects, "Secret", "symphony-executor-token");
        let secret_name = secret["metadata"]["name"].as_str().unwrap();
        let scheduler = named(&objects, "Deployment", "symphony-scheduler");
        assert!(mounts_token(scheduler, secret_name), "{overlay}: the scheduler's token");
        let executors = match overlay {
            "daemonset" | "daemonset-tls" => named(&objects, "DaemonSet", "symphony-executor"),
            _ => named(&objects, "Deployment", "symphony-executor-pool"),
        };
        assert!(mounts_token(executors, secret_name), "{overlay}: the executors' token");
        let executor_args = args(executors);
        assert!(
            executor_args
                .windows(2)
                .any(|w| w == ["--token-file", &format!("{TOKEN_DIR}/token")]),
            "{overlay}: {executor_args:?}"
        );
        assert_eq!(executor_args[0], "executor", "{overlay}");
        assert!(
            executor_args.contains(&"symphony-scheduler:7070".to_string()),
            "{overlay}"
        );
        let gpus = &containers(executors)[0]["resources"]["limits"]["nvidia.com/gpu"];
        assert_eq!(gpus.as_u64(), Some(1), "{overlay}: one GPU an executor");
        // The executors reach the scheduler pod itself (its link ports are its own).
        let headless = named(&objects, "Service", "symphony-scheduler");
        assert_eq!(headless["spec"]["clusterIP"].as_str(), Some("None"));
        let service = named(&objects, "Service", "symphony");
        let ports: Vec<u64> = service["spec"]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| p["port"].as_u64().unwrap())
            .collect();
        assert_eq!(
            ports,
            [7070, 8000, 8001, 8002],
            "{overlay}: native, HTTP, gRPC, metrics"
        );
        match overlay {
            "hpa" => {
                let hpa = named(&objects, "HorizontalPodAutoscaler", "symphony-executor-pool");
                assert_eq!(
                    hpa["spec"]["scaleTargetRef"]["name"].as_str(),
                    Some("symphony-executor-pool")
                );
                let metric = &hpa["spec"]["metrics"][0]["external"]["metric"]["name"];
                assert_eq!(metric.as_str(), Some("symphony_desired_gpus"));
                let rules = named(&objects, "ConfigMap", "symphony-prometheus-adapter-rules");
                assert!(rules["data"]["config.yaml"]
                    .as_str()
                    .unwrap()
                    .contains("symphony_desired_gpus"));
            }
            "keda" => {
                let scaled = named(&objects, "ScaledObject", "symphony-executor-pool");
                assert_eq!(scaled["apiVersion"].as_str(), Some("keda.sh/v1alpha1"));
                assert_eq!(
                    scaled["spec"]["scaleTargetRef"]["name"].as_str(),
                    Some("symphony-executor-pool")
                );
                let trigger = &scaled["spec"]["triggers"][0];
                assert_eq!(trigger["type"].as_str(), Some("prometheus"));
                assert!(trigger["metadata"]["query"]
                    .as_str()
                    .unwrap()
                    .contains("symphony_desired_gpus"));
                assert!(trigger["metadata"]["threshold"].as_str().is_some());
            }
            "daemonset-tls" => {
                // Every port TLS with the Secret's certificate, the executors checking it.
                let scheduler_args = args(scheduler);
                for pair in [
                    ["--tls-cert", "/etc/symphony/tls/tls.crt"],
                    ["--tls-key", "/etc/symphony/tls/tls.key"],
                ] {
                    assert!(scheduler_args.windows(2).any(|w| w == pair), "{scheduler_args:?}");
                }
                assert!(
                    executor_args
                        .windows(2)
                        .any(|w| w == ["--tls-ca", "/etc/symphony/tls/ca.crt"]),
                    "{executor_args:?}"
                );
                for workload in [scheduler, executors] {
                    assert!(mounts_secret(workload, "symphony-tls", "/etc/symphony/tls"));
                }
                let probes = &containers(scheduler)[0];
                for probe in ["readinessProbe", "livenessProbe"] {
                    assert_eq!(probes[probe]["httpGet"]["scheme"].as_str(), Some("HTTPS"), "{probe}");
                }
                // The executors connect to the name the certificate must carry.
                assert!(executor_args.contains(&"symphony-scheduler:7070".to_string()));
                // And serve takes the arguments: the config with a certificate made here.
                let dir = std::env::temp_dir().join(format!("symphony-deploy-tls-{}", std::process::id()));
                std::fs::create_dir_all(&dir).unwrap();
                let made = rcgen::generate_simple_self_signed(vec!["symphony-scheduler".to_string()]).unwrap();
                std::fs::write(dir.join("tls.crt"), made.cert.pem()).unwrap();
                std::fs::write(dir.join("tls.key"), made.signing_key.serialize_pem()).unwrap();
                let mut tls_config = config.clone();
                tls_config
                    .apply_tls_override(&dir.join("tls.crt"), &dir.join("tls.key"))
                    .unwrap();
                assert!(tls_config.tls.is_some());
                let _ = std::fs::remove_dir_all(&dir);
            }
            _ => {}
        }
    }
}
