//! Unchanged submissions that die as the ML frameworks do: their runs move
//! to the profile with more of what ran out, read from the fatal error of
//! their log, and ones that merely mention running out do not.

use std::time::Duration;

use evalflow_tests::cli::wait_until;
use evalflow_tests::local::{competition, run_view, runs, serve, submit, wait_ended};
use evalflow_workflow::StateTag;

/// Raises the framework's own exception on a GPU smaller than p3's, as an
/// unchanged program would: a traceback, then exit code 1.
fn dies_on_g4(module: &str, class: &str, message: &str) -> String {
    format!(
        "class {class}(RuntimeError):\n    pass\n{class}.__module__ = {module:?}\n\
         if int(os.environ['EVALFLOW_GPU_MEMORY_MIB']) < 16000:\n    raise {class}({message:?})\nhalves()"
    )
}

#[test]
fn framework_out_of_memory_escalates_and_a_mention_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("c"));
    let _engine = serve(&cli);
    let subs = dir.path().join("subs");
    let torch = dies_on_g4("torch", "OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB");
    let jax = dies_on_g4(
        "jaxlib.xla_extension",
        "XlaRuntimeError",
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes.",
    );
    let tensorflow = dies_on_g4(
        "tensorflow.python.framework.errors_impl",
        "ResourceExhaustedError",
        "OOM when allocating tensor with shape[64,256,56,56] and type float on \
         /job:localhost/replica:0/task:0/device:GPU:0 by allocator GPU_0_bfc",
    );
    let onnx = dies_on_g4(
        "onnxruntime.capi.onnxruntime_pybind11_state",
        "RuntimeException",
        "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Conv node. \
         Name:'/conv1/Conv' Status Message: /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:376 void* \
         onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*, bool, \
         onnxruntime::WaitNotificationFn) Failed to allocate memory for requested buffer of size 1073741824",
    );
    let rapids = dies_on_g4(
        "builtins",
        "MemoryError",
        "std::bad_alloc: out_of_memory: CUDA error at: /opt/conda/include/rmm/mr/device/cuda_memory_resource.hpp:60: \
         cudaErrorMemoryAllocation out of memory",
    );
    let dataloader = dies_on_g4(
        "builtins",
        "RuntimeError",
        "DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that dataloader's workers are \
         out of shared memory. Please try to raise your shared memory limit.",
    );
    let mention = "print('W bfc_allocator.cc:290] Allocator (GPU_0_bfc) ran out of memory trying to allocate 2.25GiB', \
                   file=sys.stderr)\nraise ValueError('could not broadcast input array')";
    let frameworks = [
        ("torch", torch.as_str(), "pytorch-oom"),
        ("jax", jax.as_str(), "jax-oom"),
        ("tensorflow", tensorflow.as_str(), "tensorflow-oom"),
        ("onnx", onnx.as_str(), "onnxruntime-bfc-arena"),
        ("rapids", rapids.as_str(), "rapids-oom"),
        ("dataloader", dataloader.as_str(), "dataloader-shm"),
    ];
    for (id, program, _) in frameworks {
        submit(&cli, &subs, id, program);
    }
    submit(&cli, &subs, "mention", mention);
    let ids: Vec<&str> = frameworks.iter().map(|(id, ..)| *id).chain(["mention"]).collect();
    wait_ended(&cli, &ids, Duration::from_secs(180));
    for (id, _, rule) in frameworks {
        let run = run_view(&cli, id);
        assert_eq!((run.state, run.attempts), (StateTag::Published, 2), "{id}: {run:?}");
        assert_eq!(run.profile.as_ref().map(|p| p.as_str()), Some("p3"), "{id}");
        let first = &run.attempt_details[0];
        assert_eq!((first.profile.as_str(), first.exit_code), ("g4", Some(1)), "{id}: {first:?}");
        assert_eq!(first.rule.as_deref(), Some(rule), "{id}: {first:?}");
        assert!(first.cost_usd > 0.0, "{id}: the failed attempt is paid for");
        let history = cli.ok(&["--wide", "history", &format!("{id}-public")]);
        let ran_out = if id == "dataloader" { "host memory" } else { "GPU memory" };
        assert!(history.contains(&format!("attempt 1: out of {ran_out} on g4: ")), "{id}: {history}");
    }
    let torch = run_view(&cli, "torch");
    let first = &torch.attempt_details[0];
    assert_eq!(first.rule.as_deref(), Some("pytorch-oom"));
    assert_eq!(
        first.summary.as_deref(),
        Some(
            "out of GPU memory on g4: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB \
             [pytorch-oom]"
        ),
        "why the run moved to p3, in one line of `runs --json`"
    );
    let history = cli.ok(&["--wide", "history", "jax-public"]);
    assert!(history.contains("XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory"), "{history}");
    let logs = cli.ok(&["logs", "torch-public", "--attempt", "1"]);
    assert!(
        logs.contains(
            "its log shows it ran out of GPU memory (pytorch-oom): torch.OutOfMemoryError: CUDA out of memory"
        ),
        "the evidence is shown: {logs}"
    );
    assert!(logs.contains("evidence: torch.OutOfMemoryError: CUDA out of memory") && logs.contains("exit code: 1"));
    // The private re-run of the final pick starts where the public run succeeded.
    let private = cli.data_dir.join("data/private");
    std::fs::create_dir_all(private.join("test")).unwrap();
    for i in 0..10 {
        std::fs::write(private.join(format!("test/f{i}.txt")), format!("{i}\n")).unwrap();
    }
    let labels: String = (0..10).map(|i| format!("f{i}.txt,{}\n", 1 - i % 2)).collect();
    std::fs::write(private.join("labels.csv"), format!("filename,label\n{labels}")).unwrap();
    cli.ok(&["submit", "--id", "torch", "--team", "torch", "--stage", "private", subs.join("torch").to_str().unwrap()]);
    wait_until("torch's private run ends", Duration::from_secs(60), || {
        runs(&cli).iter().any(|r| r.id.as_str() == "torch-private" && r.state.is_terminal())
    });
    let rerun = runs(&cli).into_iter().find(|r| r.id.as_str() == "torch-private").unwrap();
    assert_eq!((rerun.state, rerun.attempts), (StateTag::Published, 1), "no failed g4 attempt again: {rerun:?}");
    assert_eq!(rerun.attempt_details[0].profile.as_str(), "p3");
    let history = cli.ok(&["--wide", "history", "torch-private"]);
    assert!(
        history.contains("starts on p3: torch-public ran out of GPU memory on g4 and succeeded on p3"),
        "the placement's reason: {history}"
    );

    let mention = run_view(&cli, "mention");
    assert_eq!((mention.failure.as_deref(), mention.attempts), (Some("crashed"), 1), "{mention:?}");
    let only = &mention.attempt_details[0];
    assert_eq!((only.rule.as_deref(), only.exit_code), (None, Some(1)), "no rule matched a mere mention: {only:?}");
}
