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
modules!("elementwise", "prefill_attention", "decode_attention", "gemm", "stream_read");

/// `(module name, PTX source)` of every module built for `target`.
pub(crate) fn modules(target: PtxTarget) -> &'static [(&'static str, &'static str)] {
    match target {
        PtxTarget::Sm90a => SM90A,
        PtxTarget::Sm80 => SM80,
    }
}

/// A fingerprint of every embedded kernel (FNV-1a over the PTX of both builds): what a saved
/// measurement of the kernels (a cost-model profile) was made with.
pub fn fingerprint() -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for &(name, source) in SM90A.iter().chain(SM80) {
        for byte in name.bytes().chain(source.bytes()) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// The names of the kernels (`.entry` functions) of a PTX module.
pub(crate) fn entries(source: &'static str) -> impl Iterator<Item = &'static str> {
    source.lines().filter_map(|line| {
        let rest =
            line.trim_start().strip_prefix(".visible .entry ").or_else(|| line.trim_start().strip_prefix(".entry "))?;
        rest.split(['(', ' ']).next().filter(|name| !name.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_has_its_kernels_listed() {
        for target in [PtxTarget::Sm90a, PtxTarget::Sm80] {
            for &(module, source) in modules(target) {
                let names: Vec<&str> = entries(source).collect();
                assert!(!names.is_empty(), "{module} has no kernel");
                assert!(names.iter().all(|n| n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')), "{names:?}");
            }
        }
        let gemm: Vec<&str> =
            entries(SM90A.iter().find(|(m, _)| *m == "gemm").map(|(_, s)| *s).unwrap_or("")).collect();
        assert!(gemm.len() > 1, "{gemm:?}");
        // Every GEMM kernel the launcher names, and its fused instantiation, is in the Hopper module.
        for kernel in crate::gemm::GemmKernel::HOPPER.into_iter().chain(crate::gemm::GemmKernel::PORTABLE) {
            for name in kernel.ptx_names() {
                assert!(gemm.contains(&name), "{kernel:?}: no kernel {name} in gemm.ptx");
            }
        }
    }
}
