//! The kernel modules built from `cuda/` by `scripts/build-ptx.sh`, embedded at compile time: the
//! PTX for both targets, and for sm_90a also the cubin ptxas assembled from that PTX, which the
//! device loads instead of the PTX (the driver's JIT of the PTX took 7-10 s at a machine's first
//! start, H100).

use super::device::PtxTarget;

/// One `cuda/*.cu` file built for one target.
pub(crate) struct Module {
    /// The file's name without `.cu`.
    pub name: &'static str,
    /// Its PTX: the kernels' names, and what a cubin-less target loads.
    pub ptx: &'static str,
    /// Its machine code (sm_90a only).
    pub cubin: Option<&'static [u8]>,
}

macro_rules! modules {
    ($($name:literal),* $(,)?) => {
        const SM90A: &[Module] = &[$(Module {
            name: $name,
            ptx: include_str!(concat!("../../../ptx/sm_90a/", $name, ".ptx")),
            cubin: Some(include_bytes!(concat!("../../../ptx/sm_90a/", $name, ".cubin"))),
        }),*];
        const SM80: &[Module] = &[$(Module {
            name: $name,
            ptx: include_str!(concat!("../../../ptx/sm_80/", $name, ".ptx")),
            cubin: None,
        }),*];
    };
}

// One entry per `cuda/*.cu` file; the kernels of a file live in the module of the same name.
modules!("elementwise", "prefill_attention", "decode_attention", "gemm", "stream_read");

/// Every module built for `target`.
pub(crate) fn modules(target: PtxTarget) -> &'static [Module] {
    match target {
        PtxTarget::Sm90a => SM90A,
        PtxTarget::Sm80 => SM80,
    }
}

/// FNV-1a over the PTX of both builds and then `more`.
pub(crate) fn fingerprint(more: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for module in SM90A.iter().chain(SM80) {
        for &byte in module.name.as_bytes().iter().chain(module.ptx.as_bytes()).chain(more) {
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
            for module in modules(target) {
                let names: Vec<&str> = entries(module.ptx).collect();
                assert!(!names.is_empty(), "{} has no kernel", module.name);
                assert!(names.iter().all(|n| n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')), "{names:?}");
            }
        }
        let gemm: Vec<&str> = entries(SM90A.iter().find(|m| m.name == "gemm").map_or("", |m| m.ptx)).collect();
        assert!(gemm.len() > 1, "{gemm:?}");
        // Every GEMM kernel the launcher names, and its fused instantiation, is in the Hopper module.
        use crate::gemm::GemmKernel;
        for kernel in GemmKernel::HOPPER
            .into_iter()
            .chain(GemmKernel::PAIRS)
            .chain(GemmKernel::PORTABLE)
            .chain(GemmKernel::STREAMS)
        {
            for name in kernel.ptx_names() {
                assert!(gemm.contains(&name), "{kernel:?}: no kernel {name} in gemm.ptx");
            }
        }
        // And those that run on any GPU in the portable module.
        let portable: Vec<&str> = entries(SM80.iter().find(|m| m.name == "gemm").map_or("", |m| m.ptx)).collect();
        for kernel in GemmKernel::PORTABLE.into_iter().chain(GemmKernel::STREAMS) {
            assert!(!kernel.needs_sm90a(), "{kernel:?}");
            for name in kernel.ptx_names() {
                assert!(portable.contains(&name), "{kernel:?}: no kernel {name} in the sm_80 gemm.ptx");
            }
        }
    }

    #[test]
    fn every_hopper_cubin_holds_its_modules_kernels() {
        for module in modules(PtxTarget::Sm90a) {
            let cubin = module.cubin.unwrap_or_else(|| panic!("{}: no cubin", module.name));
            assert_eq!(cubin.get(..4), Some(&b"\x7fELF"[..]), "{}: not an ELF file", module.name);
            for name in entries(module.ptx) {
                // A kernel's name is a NUL-terminated string of the cubin's symbol table.
                let symbol = [name.as_bytes(), b"\0"].concat();
                assert!(
                    cubin.windows(symbol.len()).any(|w| w == symbol),
                    "{}: no kernel {name} in the cubin",
                    module.name
                );
            }
        }
        assert!(modules(PtxTarget::Sm80).iter().all(|m| m.cubin.is_none()));
    }
}
