//! The IAM and endpoint policies shipped in `deploy/aws/` say what
//! `deploy/aws/README.md` says they do: a job writes only under `outputs/`,
//! reads only the test sets, never lists, never reads predictions, and never
//! touches the labels; the S3 endpoint reaches only the competition's buckets.

use std::collections::BTreeSet;

use serde_json::Value;

fn policy(file: &str) -> Value {
    let path = format!("{}/../deploy/aws/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let policy: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(policy["Version"], "2012-10-17", "{file}");
    policy
}

/// A string or a list of strings, as IAM writes either.
fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::String(one) => vec![one.clone()],
        Value::Array(many) => many.iter().map(|v| v.as_str().unwrap().to_owned()).collect(),
        Value::Null => Vec::new(),
        other => panic!("not a string or a list of strings: {other}"),
    }
}

/// One statement of a policy.
struct Statement {
    actions: Vec<String>,
    resources: Vec<String>,
    not_resources: Vec<String>,
    conditional: bool,
}

/// The statements with `effect`.
fn statements(policy: &Value, effect: &str) -> Vec<Statement> {
    policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["Effect"] == effect)
        .map(|s| {
            assert!(s.get("NotAction").is_none(), "NotAction is too easy to get wrong: {s}");
            Statement {
                actions: strings(&s["Action"]),
                resources: strings(&s["Resource"]),
                not_resources: strings(&s["NotResource"]),
                conditional: s.get("Condition").is_some(),
            }
        })
        .collect()
}

/// Whether an IAM action pattern (`s3:Get*`, `*`) covers `action`.
fn covers(pattern: &str, action: &str) -> bool {
    let (pattern, action) = (pattern.to_ascii_lowercase(), action.to_ascii_lowercase());
    match pattern.strip_suffix('*') {
        Some(prefix) => action.starts_with(prefix),
        None => pattern == action,
    }
}

const TEST_SETS: [&str; 2] = ["arn:aws:s3:::${PUBLIC_TEST_SET}*", "arn:aws:s3:::${PRIVATE_TEST_SET}*"];
const OUTPUTS: &str = "arn:aws:s3:::${BUCKET}/outputs/*";

#[test]
fn the_job_role_writes_only_under_outputs_and_reads_only_the_test_sets() {
    let job = policy("job-role-policy.json");
    let allowed = statements(&job, "Allow");
    let mut granted = BTreeSet::new();
    for Statement { actions, resources, not_resources, .. } in &allowed {
        assert!(not_resources.is_empty(), "an Allow with NotResource grants too much");
        for action in actions {
            for forbidden in ["s3:ListBucket", "s3:ListBucketVersions", "s3:DeleteObject", "s3:PutObjectAcl"] {
                assert!(!covers(action, forbidden), "the job role may not have {forbidden} (it has {action})");
            }
            for resource in resources {
                granted.insert((action.clone(), resource.clone()));
            }
        }
    }
    let expected: BTreeSet<(String, String)> = std::iter::once(("s3:PutObject".to_owned(), OUTPUTS.to_owned()))
        .chain(TEST_SETS.iter().map(|r| ("s3:GetObject".to_owned(), (*r).to_owned())))
        .collect();
    assert_eq!(granted, expected, "the job role's grants");
    for (_, resource) in &granted {
        for secret in ["LABELS_BUCKET", "results/", "leaderboard/", "withdrawn/", "submissions"] {
            assert!(!resource.contains(secret), "the job role reaches {secret}: {resource}");
        }
    }

    let denied = statements(&job, "Deny");
    let denies = |action: &str, resource: &str| {
        denied.iter().any(|d| {
            !d.conditional && d.actions.iter().any(|a| covers(a, action)) && d.resources.iter().any(|r| r == resource)
        })
    };
    assert!(denies("s3:GetObject", OUTPUTS), "reading any job's predictions is denied outright");
    let rest = denied
        .iter()
        .find(|d| d.actions == ["s3:*"] && !d.not_resources.is_empty() && !d.conditional)
        .expect("every other S3 action and resource is denied outright");
    let outside: BTreeSet<&str> = rest.not_resources.iter().map(String::as_str).collect();
    assert_eq!(outside, expected.iter().map(|(_, r)| r.as_str()).collect(), "denied: all but the grants");
}

#[test]
fn the_s3_endpoint_reaches_only_the_competitions_buckets() {
    let endpoint = policy("s3-vpc-endpoint-policy.json");
    let buckets = ["${BUCKET}", "${TEST_SET_BUCKET}", "${LABELS_BUCKET}"];
    let ecr_layers = "arn:aws:s3:::prod-${REGION}-starport-layer-bucket/*";
    for statement in endpoint["Statement"].as_array().unwrap() {
        assert_eq!(statement["Effect"], "Allow");
        assert_eq!(statement["Principal"], "*", "a gateway endpoint's policy names every principal");
        assert!(statement.get("NotResource").is_none());
        for action in strings(&statement["Action"]) {
            assert!(action.starts_with("s3:") && !action.contains('*'), "{action}");
        }
        for resource in strings(&statement["Resource"]) {
            let bucket = resource.strip_prefix("arn:aws:s3:::").unwrap_or_else(|| panic!("{resource}"));
            let bucket = bucket.split('/').next().unwrap();
            let ours = buckets.contains(&bucket);
            assert!(ours || resource == ecr_layers, "the endpoint reaches {resource}");
            if resource == ecr_layers {
                assert_eq!(strings(&statement["Action"]), ["s3:GetObject"], "ECR's layers are only read");
            }
        }
    }
}

#[test]
fn the_worker_and_engine_policies_grant_no_wildcard_s3_access() {
    for file in ["worker-policy.json", "engine-policy.json"] {
        let policy = policy(file);
        for allowed in statements(&policy, "Allow") {
            assert!(allowed.not_resources.is_empty(), "{file}");
            for action in allowed.actions.iter().filter(|a| a.starts_with("s3:")) {
                assert!(!action.contains('*'), "{file}: {action}");
                let resources = &allowed.resources;
                assert!(resources.iter().all(|r| r.starts_with("arn:aws:s3:::$")), "{file}: {resources:?}");
                if covers(action, "s3:ListBucket") {
                    assert!(allowed.conditional, "{file}: listing is limited by prefix");
                }
            }
        }
    }
}

#[test]
fn the_engine_reads_only_batchs_job_logs() {
    let engine = policy("engine-policy.json");
    let reads: Vec<Statement> =
        statements(&engine, "Allow").into_iter().filter(|s| s.actions.iter().any(|a| a.starts_with("logs:"))).collect();
    let [read] = reads.as_slice() else { panic!("one statement reads logs") };
    assert_eq!(read.actions, ["logs:GetLogEvents"], "the classifier and `evalflow logs` read, never write");
    let group = format!("log-group:{}:log-stream:*", evalflow_activities::aws::logs::LOG_GROUP);
    assert!(read.resources.iter().all(|r| r.ends_with(&group)), "only Batch's group: {:?}", read.resources);
}

#[test]
fn the_engine_may_stop_a_job_it_finds_unplaceable() {
    let engine = policy("engine-policy.json");
    let allowed = statements(&engine, "Allow");
    for action in ["batch:DescribeJobs", "batch:TerminateJob"] {
        assert!(allowed.iter().any(|s| s.actions.iter().any(|a| covers(a, action))), "the reconciler needs {action}");
    }
    assert!(
        !allowed.iter().any(|s| s.actions.iter().any(|a| covers(a, "batch:SubmitJob"))),
        "the engine launches nothing"
    );
}
