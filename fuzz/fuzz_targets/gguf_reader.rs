//! Feeds arbitrary bytes to the GGUF reader: parsing must return `Ok` or `Err`, never panic,
//! overflow, read out of bounds or allocate without bound; dequantizing each tensor of a file
//! that parses must give a value per element or an error, never a panic; and reading the file as a
//! model must check every size it declares (layers, hidden size, heads, vocabulary, context)
//! against its bounds and the tensors present before sizing anything by it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nexus_runtime::weights::config::WeightSource;
use nexus_runtime::weights::gguf::GgufFile;
use nexus_runtime::weights::gguf_weights::GgufModel;

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
    let Ok(model) = GgufModel::new(file) else {
        return;
    };
    for (name, shape) in model.config().weight_shapes() {
        // Non-finite values are refused; a weight that loads has the shape its config implies.
        if let Ok(tensor) = model.load(name) {
            assert_eq!(tensor.shape, shape);
            assert!(tensor.data.iter().all(|v| v.is_finite()));
        }
    }
});
