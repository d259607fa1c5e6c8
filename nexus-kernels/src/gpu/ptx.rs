//! The PTX modules built from `cuda/` by `scripts/build-ptx.sh`, embedded at compile time.

use super::device::PtxTarget;

macro_rules! modules {
    ($($name:literal),* $(,)?) => {
        const SM90A: &[(&str, &str)] =
            &[$(($name, include_str!(concat!("../../../ptx/sm_90a/", $name, ".ptx")))),*];
        const SM80: &[(&str, &str)] =
            &[$(($name, include_str!(concat!("../../../ptx/sm_80/", $name, ".ptx")))),*];
    };
}

// One entry per `cuda/*.cu` file; the kernels of a file live in the module of the same name.
modules!("elementwise", "prefill_attention", "decode_attention", "gemm");

/// `(module name, PTX source)` of every module built for `target`.
pub(crate) fn modules(target: PtxTarget) -> &'static [(&'static str, &'static str)] {
    match target {
        PtxTarget::Sm90a => SM90A,
        PtxTarget::Sm80 => SM80,
    }
}
