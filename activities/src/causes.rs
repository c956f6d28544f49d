//! Why a job died, from its log: the fatal out-of-memory errors of the ML
//! frameworks, told apart the way an organizer reading the log would.
//!
//! A submission runs unchanged, so a PyTorch, TensorFlow or JAX program
//! that runs out of GPU memory just exits 1 with its framework's message.
//! [`Signatures`] is a table of such messages (the built-in ones, plus
//! the organizer's `[[causes.signature]]` in `evalflow.toml`), each naming
//! the resource it shows ran out.
//!
//! The cause is the **fatal** error, not any mention:
//!
//! - nothing is read into a job that succeeded (the caller asks only for
//!   failed ones);
//! - when the log holds a Python traceback, only the exception that ended
//!   the program counts: the text after the last `Traceback (most recent
//!   call last):` from its first unindented line on. An OOM warning earlier
//!   in a log that then dies of a `ValueError` is a crash;
//! - without a traceback (a C++ abort, a framework's own fatal log line),
//!   the last [`TAIL_LINES`] lines count;
//! - a signature marked `fatal = false` (an allocator's warning, which a
//!   framework may print and survive) counts only when nothing else in that
//!   region reads as the error that ended the program.

use regex::Regex;
use serde::{Deserialize, Serialize};

use evalflow_workflow::Resource;

/// Lines at the end of a log read when it holds no traceback.
pub const TAIL_LINES: usize = 25;
/// The longest line kept as evidence, in bytes.
const EVIDENCE_MAX_LEN: usize = 300;

/// What ran out, as a signature names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Exhausted {
    /// The GPU's memory.
    GpuMemory,
    /// The host's memory.
    HostMemory,
    /// Shared memory (`/dev/shm`), which grows with the host.
    SharedMemory,
}

impl Exhausted {
    /// The lowercase words for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Exhausted::GpuMemory => "GPU memory",
            Exhausted::HostMemory => "host memory",
            Exhausted::SharedMemory => "shared memory",
        }
    }

    /// The resource of the placement ladder that has more of it.
    pub fn resource(self) -> Resource {
        match self {
            Exhausted::GpuMemory => Resource::GpuMemory,
            Exhausted::HostMemory | Exhausted::SharedMemory => Resource::HostMemory,
        }
    }
}

/// One signature as written in `evalflow.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureConfig {
    /// Its name, shown as the rule that matched.
    pub name: String,
    /// What it shows ran out.
    pub resource: Exhausted,
    /// A regular expression matched against one line of the log.
    pub pattern: String,
    /// Whether the line is the program's fatal error (`false`: a warning a
    /// program may survive, counted only when nothing else killed it).
    #[serde(default = "fatal_default")]
    pub fatal: bool,
}

fn fatal_default() -> bool {
    true
}

/// A signature that does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("[[causes.signature]] {name:?}: pattern {pattern:?} is not a regular expression ({problem})")]
pub struct SignatureError {
    name: String,
    pattern: String,
    problem: String,
}

/// Why a job died, with the evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cause {
    /// What ran out.
    pub resource: Exhausted,
    /// The signature that matched.
    pub rule: String,
    /// The line it matched, trimmed and cut to a few hundred bytes.
    pub line: String,
}

#[derive(Debug, Clone)]
struct Signature {
    name: String,
    resource: Exhausted,
    pattern: Regex,
    fatal: bool,
}

/// The table of signatures, the built-in ones first.
#[derive(Debug, Clone)]
pub struct Signatures {
    table: Vec<Signature>,
    /// [`FATAL_LINE`], compiled.
    fatal_line: Regex,
}

/// The built-in signatures: (name, resource, pattern, fatal).
const BUILTIN: &[(&str, Exhausted, &str, bool)] = &[
    ("pytorch-oom", Exhausted::GpuMemory, r"^(torch\.(cuda\.)?)?OutOfMemoryError: CUDA out of memory", true),
    ("pytorch-oom-old", Exhausted::GpuMemory, r"^RuntimeError: CUDA out of memory\.", true),
    ("pytorch-cuda-error-oom", Exhausted::GpuMemory, r"^RuntimeError: CUDA error: out of memory", true),
    (
        "pytorch-cuda-runtime-oom",
        Exhausted::GpuMemory,
        r"^RuntimeError: cuda runtime error \(2\) : out of memory",
        true,
    ),
    ("cublas-alloc-failed", Exhausted::GpuMemory, r"^RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED", true),
    ("cudnn-not-initialized", Exhausted::GpuMemory, r"^RuntimeError: cuDNN error: CUDNN_STATUS_NOT_INITIALIZED", true),
    ("tensorflow-oom", Exhausted::GpuMemory, r"ResourceExhaustedError\b.*(OOM when allocating|out of memory)", true),
    ("tensorflow-oom-detail", Exhausted::GpuMemory, r"^\s*OOM when allocating tensor", true),
    ("jax-oom", Exhausted::GpuMemory, r"XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory", true),
    ("onnxruntime-bfc-arena", Exhausted::GpuMemory, r"BFCArena::AllocateRawInternal.*Failed to allocate memory", true),
    ("onnxruntime-cuda-oom", Exhausted::GpuMemory, r"CUDA failure 2: out of memory", true),
    ("rapids-oom", Exhausted::GpuMemory, r"std::bad_alloc: out_of_memory: CUDA error", true),
    (
        "dataloader-shm",
        Exhausted::SharedMemory,
        r"DataLoader worker \(pid \d+\) is killed by signal: Bus error|insufficient shared memory \(shm\)",
        true,
    ),
    ("tensorflow-allocator-warning", Exhausted::GpuMemory, r"ran out of memory trying to allocate", false),
    ("cuda-driver-oom", Exhausted::GpuMemory, r"CUDA_ERROR_OUT_OF_MEMORY", false),
];

/// A line that reads as the error that ended a program: a Python
/// exception, a C++ `terminate`, a fatal log line.
const FATAL_LINE: &str =
    r"^([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b|terminate called|\s*what\(\):|F\d{4} |Fatal Python error)";

impl Signatures {
    /// The built-in table followed by `extra`, the organizer's.
    pub fn new(extra: &[SignatureConfig]) -> Result<Signatures, SignatureError> {
        let builtin = BUILTIN.iter().map(|&(name, resource, pattern, fatal)| SignatureConfig {
            name: name.to_owned(),
            resource,
            pattern: pattern.to_owned(),
            fatal,
        });
        let compiled = builtin.chain(extra.iter().cloned()).map(|config| {
            let pattern = Regex::new(&config.pattern).map_err(|e| SignatureError {
                name: config.name.clone(),
                pattern: config.pattern.clone(),
                problem: e.to_string(),
            })?;
            Ok(Signature { name: config.name, resource: config.resource, pattern, fatal: config.fatal })
        });
        let table = compiled.collect::<Result<_, _>>()?;
        let fatal_line = Regex::new(FATAL_LINE).map_err(|e| SignatureError {
            name: "fatal-line".into(),
            pattern: FATAL_LINE.into(),
            problem: e.to_string(),
        })?;
        Ok(Signatures { table, fatal_line })
    }

    /// Why a failed job died, if its log shows it ran out of something.
    pub fn cause(&self, log: &str) -> Option<Cause> {
        let region = fatal_region(log);
        let found = |fatal: bool| {
            self.table.iter().filter(|s| s.fatal == fatal).find_map(|signature| {
                let line = region.iter().find(|line| signature.pattern.is_match(line))?;
                Some(Cause { resource: signature.resource, rule: signature.name.clone(), line: evidence(line) })
            })
        };
        if let Some(cause) = found(true) {
            return Some(cause);
        }
        let died_of_something_else = region.iter().any(|line| self.fatal_line.is_match(line));
        if died_of_something_else { None } else { found(false) }
    }
}

/// The lines that say how the program ended.
fn fatal_region(log: &str) -> Vec<&str> {
    const HEADER: &str = "Traceback (most recent call last):";
    if let Some(at) = log.rfind(HEADER) {
        let after = &log[at + HEADER.len()..];
        let lines: Vec<&str> = after.lines().collect();
        if let Some(first) = lines.iter().position(|l| !l.is_empty() && !l.starts_with(char::is_whitespace)) {
            return lines[first..].to_vec();
        }
    }
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].to_vec()
}

fn evidence(line: &str) -> String {
    let line = line.trim();
    let mut cut = line.len().min(EVIDENCE_MAX_LEN);
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    let printable: String = line[..cut].chars().filter(|c| !c.is_control()).collect();
    if cut < line.len() { format!("{printable}...") } else { printable }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cause(log: &str) -> Option<(Exhausted, String)> {
        Signatures::new(&[]).unwrap().cause(log).map(|c| (c.resource, c.rule))
    }

    fn traceback(last: &str) -> String {
        format!(
            "loading model\nTraceback (most recent call last):\n  File \"/work/predict.py\", line 42, in <module>\n    \
             out = model(batch)\n  File \"/usr/lib/python3/dist-packages/torch/nn/modules/module.py\", line 1501, \
             in _call_impl\n    return forward_call(*args, **kwargs)\n{last}\n"
        )
    }

    /// Real messages, one per signature: (log, expected rule).
    fn recorded() -> Vec<(String, &'static str)> {
        vec![
            (
                traceback(
                    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total \
                     capacity of 14.58 GiB of which 1.23 GiB is free. Process 1234 has 13.34 GiB memory in use. Of \
                     the allocated memory 12.80 GiB is allocated by PyTorch, and 312.45 MiB is reserved by PyTorch \
                     but unallocated. If reserved but unallocated memory is large try setting \
                     PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.",
                ),
                "pytorch-oom",
            ),
            (
                traceback("torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 14.76 GiB total capacity; 13.02 GiB already allocated)"),
                "pytorch-oom",
            ),
            (
                traceback(
                    "RuntimeError: CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 15.78 GiB total \
                     capacity; 14.32 GiB already allocated; 3.75 MiB free; 14.48 GiB reserved in total by PyTorch)",
                ),
                "pytorch-oom-old",
            ),
            (
                traceback(
                    "RuntimeError: CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported \
                     at some other API call, so the stacktrace below might be incorrect.\nFor debugging consider \
                     passing CUDA_LAUNCH_BLOCKING=1.",
                ),
                "pytorch-cuda-error-oom",
            ),
            (
                traceback("RuntimeError: cuda runtime error (2) : out of memory at /pytorch/aten/src/THC/THCCachingAllocator.cpp:510"),
                "pytorch-cuda-runtime-oom",
            ),
            (
                traceback("RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
                "cublas-alloc-failed",
            ),
            (traceback("RuntimeError: cuDNN error: CUDNN_STATUS_NOT_INITIALIZED"), "cudnn-not-initialized"),
            (
                traceback(
                    "tensorflow.python.framework.errors_impl.ResourceExhaustedError: OOM when allocating tensor \
                     with shape[256,1024,1024] and type float on /job:localhost/replica:0/task:0/device:GPU:0 by \
                     allocator GPU_0_bfc [Op:MatMul]",
                ),
                "tensorflow-oom",
            ),
            (
                traceback(
                    "tensorflow.python.framework.errors_impl.ResourceExhaustedError: Graph execution error:\n\n\
                     Detected at node 'model/conv2d/Conv2D' defined at (most recent call last):\n    \
                     File \"predict.py\", line 30, in <module>\nNode: 'model/conv2d/Conv2D'\n\
                     OOM when allocating tensor with shape[64,256,224,224] and type float on \
                     /job:localhost/replica:0/task:0/device:GPU:0 by allocator GPU_0_bfc\n\t \
                     [[{{node model/conv2d/Conv2D}}]]",
                ),
                "tensorflow-oom-detail",
            ),
            (
                traceback(
                    "jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to \
                     allocate 17179869184 bytes.\nBufferAssignment OOM Debugging.",
                ),
                "jax-oom",
            ),
            (
                traceback(
                    "onnxruntime.capi.onnxruntime_pybind11_state.RuntimeException: [ONNXRuntimeError] : 6 : \
                     RUNTIME_EXCEPTION : Non-zero status code returned while running Conv node. Name:'Conv_0' \
                     Status Message: /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:376 void* \
                     onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*, bool, \
                     onnxruntime::WaitNotificationFn) Failed to allocate memory for requested buffer of size 1073741824",
                ),
                "onnxruntime-bfc-arena",
            ),
            (
                "2026-11-30 10:00:01.000 [E:onnxruntime:, cuda_call.cc:116 CudaCall] CUDA failure 2: out of memory ; \
                 GPU=0 ; hostname=ip-10-0-0-1 ; file=/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_allocator.cc \
                 ; line=47 ; expr=cudaMalloc((void**)&p, size);\n"
                    .to_owned(),
                "onnxruntime-cuda-oom",
            ),
            (
                traceback(
                    "MemoryError: std::bad_alloc: out_of_memory: CUDA error at: \
                     /opt/conda/include/rmm/mr/device/cuda_memory_resource.hpp:70: cudaErrorMemoryAllocation out of memory",
                ),
                "rapids-oom",
            ),
            (
                traceback(
                    "RuntimeError: DataLoader worker (pid 2207) is killed by signal: Bus error. It is possible \
                     that dataloader's workers are out of shared memory. Please try to raise your shared memory limit.",
                ),
                "dataloader-shm",
            ),
            (
                "2026-11-30 10:00:00.000000: W tensorflow/core/common_runtime/bfc_allocator.cc:290] Allocator \
                 (GPU_0_bfc) ran out of memory trying to allocate 2.25GiB with freed_by_count=0.\nAborted (core dumped)\n"
                    .to_owned(),
                "tensorflow-allocator-warning",
            ),
        ]
    }

    #[test]
    fn each_frameworks_fatal_out_of_memory_is_recognised() {
        for (log, rule) in recorded() {
            let got = Signatures::new(&[]).unwrap().cause(&log);
            assert_eq!(got.as_ref().map(|c| c.rule.as_str()), Some(rule), "{log}");
            let evidence = got.unwrap().line;
            assert!(!evidence.is_empty() && evidence.len() <= EVIDENCE_MAX_LEN + 3, "{evidence}");
        }
        let shm = cause(&recorded()[13].0).unwrap();
        assert_eq!(shm.0.resource(), Resource::HostMemory, "shared memory grows with the host");
    }

    #[test]
    fn a_mention_is_not_the_cause_the_fatal_error_is() {
        let warned_then_failed = format!(
            "W bfc_allocator.cc:290] Allocator (GPU_0_bfc) ran out of memory trying to allocate 2.25GiB\n{}",
            traceback("ValueError: could not broadcast input array from shape (3,224,224) into shape (224,224)")
        );
        assert_eq!(cause(&warned_then_failed), None, "it died of a ValueError");
        let mentioned = traceback("KeyError: 'CUDA out of memory'");
        assert_eq!(cause(&mentioned), None);
        let caught_then_other = format!(
            "{}\nDuring handling of the above exception, another exception occurred:\n\n{}",
            traceback("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
            traceback("FileNotFoundError: [Errno 2] No such file or directory: '/output/x'")
        );
        assert_eq!(cause(&caught_then_other), None, "the last exception is the fatal one");
        let printed = "retrying after RuntimeError: CUDA out of memory. Tried to allocate 1 GiB\ndone\n";
        assert_eq!(cause(printed), None, "a message quoted mid-line is not an error line");
    }

    #[test]
    fn the_organizer_extends_the_table_and_bad_patterns_are_named() {
        let extra = SignatureConfig {
            name: "mxnet".into(),
            resource: Exhausted::GpuMemory,
            pattern: r"^mxnet\.base\.MXNetError: .*out of memory".into(),
            fatal: true,
        };
        let signatures = Signatures::new(std::slice::from_ref(&extra)).unwrap();
        let log = traceback(
            "mxnet.base.MXNetError: [10:00:00] src/storage/./pooled_storage_manager.h:161: cudaMalloc failed: out of memory",
        );
        assert_eq!(signatures.cause(&log).map(|c| c.rule), Some("mxnet".into()));
        let bad = SignatureConfig { pattern: "(unclosed".into(), ..extra };
        let err = Signatures::new(&[bad]).unwrap_err().to_string();
        assert!(
            err.starts_with("[[causes.signature]] \"mxnet\": pattern \"(unclosed\" is not a regular expression"),
            "{err}"
        );
    }
}
