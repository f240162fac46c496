//! deploy/kubernetes/: the kustomizations render with a real kustomize (the
//! one `scripts/ensure-tools` installs) and the manifests hold the
//! properties we promise: probes on the right endpoints, a pod that meets
//! the Pod Security "restricted" profile with a read-only root, a grace
//! above the shutdown grace, default-deny networking with the allows the
//! agent needs, a disruption budget and an autoscaler that owns the replica
//! count, a Secret made only from real files.

use std::collections::HashMap;
use std::process::Command;

use bulkhead_deploy::{kubernetes_copy, kustomize_build};
use serde::Deserialize;
use serde_json::{Value, json};

/// The rendered kustomization `sub` of deploy/kubernetes (`""` or
/// `"sandboxd"`): every document, keyed by `Kind/name`.
fn render(sub: &str) -> HashMap<String, Value> {
    let text = kustomize_build(sub);
    let mut objects = HashMap::new();
    for document in serde_norway::Deserializer::from_str(&text) {
        let object = Value::deserialize(document).unwrap();
        if object.is_null() {
            continue;
        }
        let key = format!(
            "{}/{}",
            object["kind"].as_str().unwrap(),
            object["metadata"]["name"].as_str().unwrap()
        );
        assert!(objects.insert(key.clone(), object).is_none(), "{key} twice");
    }
    objects
}

/// The one object of `kind` whose name starts with `prefix` (generated
/// names carry a hash).
fn generated<'a>(
    objects: &'a HashMap<String, Value>,
    kind: &str,
    prefix: &str,
) -> (&'a str, &'a Value) {
    let found: Vec<_> = objects
        .iter()
        .filter(|(key, _)| key.starts_with(&format!("{kind}/{prefix}-")))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {kind} {prefix}-<hash>: {:?}",
        objects.keys()
    );
    (found[0].1["metadata"]["name"].as_str().unwrap(), found[0].1)
}

fn env_of(objects: &HashMap<String, Value>) -> HashMap<String, String> {
    objects["ConfigMap/bulkhead"]["data"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_str()
                    .expect("ConfigMap values are strings")
                    .to_string(),
            )
        })
        .collect()
}

#[test]
fn the_manifests_parse_and_hold_their_promises() {
    let objects = render("");
    for kind in [
        "Namespace/bulkhead",
        "ServiceAccount/bulkhead",
        "ConfigMap/bulkhead",
        "Deployment/bulkhead",
        "Service/bulkhead",
        "NetworkPolicy/default-deny",
        "PodDisruptionBudget/bulkhead",
        "HorizontalPodAutoscaler/bulkhead",
    ] {
        assert!(objects.contains_key(kind), "{kind} is missing");
    }
    assert_eq!(
        objects["Namespace/bulkhead"]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );

    let deployment = &objects["Deployment/bulkhead"];
    assert_eq!(deployment["metadata"]["namespace"], "bulkhead");
    assert!(
        deployment["spec"]["replicas"].is_null(),
        "the autoscaler owns the replica count"
    );
    let pod = &deployment["spec"]["template"]["spec"];
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(deployment["spec"]["selector"]["matchLabels"], *labels);
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let container = &containers[0];

    // Probes: start-up and liveness ask the process, readiness its
    // dependencies, all on the named port.
    assert_eq!(container["ports"][0]["containerPort"], 8000);
    for (probe, path) in [
        ("startupProbe", "/health"),
        ("livenessProbe", "/health"),
        ("readinessProbe", "/ready/replica"),
    ] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], "http", "{probe}");
    }

    // Pod Security "restricted", plus a read-only root.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_ne!(pod["securityContext"]["runAsUser"], 0);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let security = &container["securityContext"];
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert!(security["capabilities"]["add"].is_null());
    assert!(security["privileged"].is_null() || security["privileged"] == false);
    assert!(pod["hostNetwork"].is_null() && pod["hostPID"].is_null());
    for volume in pod["volumes"].as_array().unwrap() {
        assert!(
            volume["hostPath"].is_null(),
            "restricted allows no hostPath: {volume}"
        );
    }
    // What must be written is an emptyDir.
    let mounts: HashMap<&str, &str> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["mountPath"].as_str().unwrap(),
                m["name"].as_str().unwrap(),
            )
        })
        .collect();
    for writable in ["/tmp", "/data"] {
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mounts[writable])
            .unwrap();
        assert!(volume["emptyDir"].is_object(), "{writable}: {volume}");
    }
    // Secrets arrive as files where Bulkhead looks for them.
    let secrets = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mounts["/run/secrets"])
        .unwrap();
    let (secret_name, secret) = generated(&objects, "Secret", "bulkhead");
    assert_eq!(secrets["secret"]["secretName"], secret_name);
    let secret_keys = secret["data"].as_object().unwrap();
    for key in ["openai_api_key", "database_password", "sandboxd_token"] {
        assert!(secret_keys.contains_key(key), "{key}");
    }

    // Resources, and a grace above preStop plus the server's own grace.
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                container["resources"][kind][resource].is_string(),
                "{kind}.{resource}"
            );
        }
    }
    let env = env_of(&objects);
    let shutdown_grace: u64 = env["SHUTDOWN_GRACE_SECONDS"].parse().unwrap();
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .expect("a preStop delay");
    assert!(pre_stop > 0);
    let termination = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        termination > pre_stop + shutdown_grace,
        "{termination} <= {pre_stop} + {shutdown_grace}"
    );
    assert_eq!(container["envFrom"][0]["configMapRef"]["name"], "bulkhead");
    assert_eq!(env["AGENT_MODE"], "production");
    // No secret sits in the ConfigMap.
    for (name, value) in &env {
        assert!(
            !name.contains("KEY") && !name.contains("TOKEN") && !name.contains("PASSWORD"),
            "{name} belongs in the Secret"
        );
        assert!(!value.contains("REPLACE"), "{name}={value}");
    }
    let database = url::Url::parse(&env["DATABASE_URL"]).unwrap();
    assert!(
        database.password().is_none(),
        "the password comes from the Secret"
    );

    // The Service reaches the pods.
    let service = &objects["Service/bulkhead"];
    assert_eq!(service["spec"]["selector"], *labels);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");

    // Default deny, then only what is needed.
    let deny = &objects["NetworkPolicy/default-deny"]["spec"];
    assert_eq!(deny["podSelector"], json!({}));
    assert_eq!(deny["policyTypes"], json!(["Ingress", "Egress"]));
    assert!(deny["ingress"].is_null() && deny["egress"].is_null());
    let egress = &objects["NetworkPolicy/bulkhead-egress"]["spec"];
    let ports: Vec<u64> = egress["egress"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|rule| rule["ports"].as_array().unwrap().iter())
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    for port in [53, 5432, 7070, 443] {
        assert!(ports.contains(&port), "egress to port {port}: {ports:?}");
    }
    let https = egress["egress"]
        .as_array()
        .unwrap()
        .iter()
        .find(|rule| rule["to"][0]["ipBlock"].is_object())
        .unwrap();
    assert!(
        https["to"][0]["ipBlock"]["except"]
            .as_array()
            .unwrap()
            .contains(&json!("169.254.0.0/16")),
        "the metadata address stays out of reach"
    );
    let ingress = &objects["NetworkPolicy/bulkhead-ingress"]["spec"];
    assert_eq!(ingress["podSelector"]["matchLabels"], *labels);
    assert_eq!(ingress["ingress"][0]["ports"][0]["port"], "http");

    let budget = &objects["PodDisruptionBudget/bulkhead"]["spec"];
    assert_eq!(budget["selector"]["matchLabels"], *labels);
    let min_available = budget["minAvailable"].as_u64().unwrap();
    let autoscaler = &objects["HorizontalPodAutoscaler/bulkhead"]["spec"];
    assert_eq!(autoscaler["scaleTargetRef"]["name"], "bulkhead");
    assert_eq!(autoscaler["scaleTargetRef"]["kind"], "Deployment");
    let min_replicas = autoscaler["minReplicas"].as_u64().unwrap();
    assert!(
        min_replicas > min_available,
        "a node drain must be able to evict a pod"
    );
    assert!(autoscaler["maxReplicas"].as_u64().unwrap() >= min_replicas);
}

/// The ConfigMap and Secret are what the server reads: together they pass
/// the same validation `bulkhead serve` does at start.
#[test]
fn the_config_map_and_secret_make_a_valid_configuration() {
    let objects = render("");
    let secrets = tempfile::tempdir().unwrap();
    use base64::Engine;
    for (name, value) in generated(&objects, "Secret", "bulkhead").1["data"]
        .as_object()
        .unwrap()
    {
        let value = base64::engine::general_purpose::STANDARD
            .decode(value.as_str().unwrap())
            .unwrap();
        std::fs::write(secrets.path().join(name), value).unwrap();
    }
    let mut env = env_of(&objects);
    env.insert("SECRETS_DIR".into(), secrets.path().display().to_string());
    let config = bulkhead_server::Config::from_env(&bulkhead_server::Environment::from_map(env))
        .unwrap_or_else(|e| panic!("the manifests' configuration is refused: {e}"));
    assert_eq!(config.database_backend().as_str(), "postgres");
    assert!(
        config.sandbox.sandboxd_token.is_some(),
        "read from the mounted Secret"
    );
    assert!(
        config.model.api_key.is_some(),
        "read from the mounted Secret"
    );
}

/// Without the secret files there is nothing to apply: no placeholder
/// Secret can overwrite a real one.
#[test]
fn without_the_secret_files_the_kustomizations_do_not_render() {
    for sub in ["", "sandboxd"] {
        let copy = kubernetes_copy(false);
        let output = Command::new("kustomize")
            .arg("build")
            .arg(copy.path().join("kubernetes").join(sub))
            .output()
            .expect("kustomize runs");
        assert!(!output.status.success(), "{sub:?} rendered without secrets");
        let error = String::from_utf8_lossy(&output.stderr);
        assert!(error.contains("secrets/"), "{sub:?}: {error}");
    }
}

#[test]
fn the_optional_sandboxd_manifests_parse_and_admit_only_bulkhead() {
    let objects = render("sandboxd");
    let policy = &objects["NetworkPolicy/sandboxd"]["spec"];
    assert_eq!(
        policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "bulkhead"
    );
    let pod = &objects["Deployment/sandboxd"]["spec"]["template"]["spec"];
    // Placed only where an engine socket exists, with a pod-level context.
    assert_eq!(
        pod["nodeSelector"]["bulkhead.dev/docker-engine"], "true",
        "{pod}"
    );
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let security = &pod["containers"][0]["securityContext"];
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    let (secret_name, _) = generated(&objects, "Secret", "sandboxd");
    assert_eq!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "secrets")
            .unwrap()["secret"]["secretName"],
        secret_name
    );
}
