//! Feeds arbitrary bytes to the GGUF reader: parsing must return `Ok` or `Err`, never panic,
//! overflow, read out of bounds or allocate without bound; and dequantizing each tensor of a file
//! that parses must give a value per element or an error, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nexus_runtime::weights::gguf::GgufFile;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    for info in file.tensors() {
        // Failures are fine (IQ types are not dequantized); what is checked is that they are errors.
        if let Ok(tensor) = file.tensor_f32(&info.name) {
            assert_eq!(tensor.data.len(), tensor.shape.iter().product::<usize>());
        }
    }
});
