//! The Llama-family model (Llama 2/3, Mistral, Qwen2, SmolLM), written once over [`Backend`].
//!
//! Pre-norm decoder layers: RMSNorm → fused QKV projection (with Qwen2's bias) → RoPE → causal
//! GQA attention over the paged KV cache → output projection → residual; RMSNorm → fused
//! gate/up projection → SiLU-and-mul → down projection → residual. Q/K/V and gate/up are
//! concatenated at load so that each is one GEMM.
//!
//! Weights and the [`KvCache`] are shared; a forward pass runs in the backend phase it is given
//! ([`Backend::Phase`]), so two of them (a prefill and a decode) can be in flight at once.

pub mod backend;
pub mod cpu;
pub mod cuda;
pub mod simulated;

use nexus_kernels::{PagedKvLayout, QkvLayout, RopeConfig};

use std::sync::atomic::{AtomicU64, Ordering};

use crate::model::backend::{Backend, StepInput, StepKind, StepScope};
use crate::weights::config::{LayerWeight, ModelConfig, WeightName, WeightSource};
use crate::weights::gguf::HostTensor;
use crate::{Error, Result};

/// One decoder layer's weights. Where the backend [folds norm gains](Backend::folds_norm_gains),
/// `qkv` and `gate_up` hold the gains of `attn_norm` and `ffn_norm`.
struct Layer<B: Backend> {
    attn_norm: B::Weight,
    qkv: B::Weight,
    qkv_bias: Option<B::Weight>,
    o: B::Weight,
    ffn_norm: B::Weight,
    gate_up: B::Weight,
    down: B::Weight,
}

impl<B: Backend> Layer<B> {
    /// The layer of these weights, the norms' gains folded into the GEMMs after them where the
    /// backend does that.
    fn new(backend: &B, mut layer: Layer<B>) -> Result<Self> {
        if backend.folds_norm_gains() {
            layer.qkv = backend.fold_norm_gain(layer.qkv, &layer.attn_norm)?;
            layer.gate_up = backend.fold_norm_gain(layer.gate_up, &layer.ffn_norm)?;
        }
        Ok(layer)
    }
}

/// A loaded Llama-family model.
pub struct LlamaModel<B: Backend> {
    config: ModelConfig,
    embedding: B::Weight,
    layers: Vec<Layer<B>>,
    final_norm: B::Weight,
    /// `None` when the LM head is tied to the embedding.
    lm_head: Option<B::Weight>,
    /// A gain of ones, which the layers' norm kernels run with where the backend folds their
    /// gains into the next weights ([`Backend::folds_norm_gains`]).
    unit_gain: Option<B::Weight>,
}

impl<B: Backend> std::fmt::Debug for LlamaModel<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaModel").field("config", &self.config).finish_non_exhaustive()
    }
}

/// A model's KV cache: one pool pair per layer, all with the same layout.
///
/// The pools hold one block more than asked for, never handed out: the padding rows of a
/// recorded decode step write their keys and values there ([`Backend::run_step`]).
pub struct KvCache<B: Backend> {
    layout: PagedKvLayout,
    pools: Vec<B::KvPool>,
    /// Unique per cache (and so per model: a cache belongs to the model that made it), so that a
    /// backend's recordings of steps over other caches are never replayed over this one.
    id: u64,
    /// The most tokens of one sequence, when less than the model's context.
    seq_len_limit: Option<usize>,
}

impl<B: Backend> std::fmt::Debug for KvCache<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache").field("layout", &self.layout).field("layers", &self.pools.len()).finish()
    }
}

impl<B: Backend> KvCache<B> {
    /// The layout of every layer's pools (including the padding block).
    pub fn layout(&self) -> PagedKvLayout {
        self.layout
    }

    /// The block that padding rows write to; no sequence owns it.
    pub fn padding_block(&self) -> u32 {
        (self.layout.num_blocks - 1) as u32
    }

    /// Limits sequences to `tokens` (below the model's context), so that recorded decode steps
    /// hold block tables of that width only (recordings made for another limit are not replayed).
    pub fn limit_seq_len(&mut self, tokens: usize) {
        self.seq_len_limit = Some(tokens);
    }

    /// The most tokens of one sequence of `config`'s model in this cache's steps.
    pub fn max_seq_len(&self, config: &ModelConfig) -> usize {
        self.seq_len_limit.map_or(config.max_position_embeddings, |l| l.min(config.max_position_embeddings))
    }
}

/// Stacks tensors along their first dimension: vectors into one vector, matrices of equal row
/// length into one matrix.
fn concat_rows(parts: Vec<HostTensor>) -> HostTensor {
    let mut shape = parts[0].shape.clone();
    shape[0] = parts.iter().map(|p| p.shape[0]).sum();
    let mut data = Vec::with_capacity(shape.iter().product());
    for p in parts {
        data.extend_from_slice(&p.data);
    }
    HostTensor { shape, data }
}

/// A gain of `hidden` ones where the backend folds the norms' gains into the weights after them.
fn unit_gain<B: Backend>(backend: &B, hidden: usize) -> Result<Option<B::Weight>> {
    if !backend.folds_norm_gains() {
        return Ok(None);
    }
    Ok(Some(backend.upload(HostTensor { shape: vec![hidden], data: vec![1.0; hidden] })?))
}

impl<B: Backend> LlamaModel<B> {
    /// Loads every weight of `source` into `backend`. `progress(done, total)` is called after each
    /// layer.
    pub fn load(backend: &B, source: &dyn WeightSource, mut progress: impl FnMut(usize, usize)) -> Result<Self> {
        let c = source.config().clone();
        c.validate()?;
        // Loads `name` and checks its shape against the configuration's (a source other than the
        // file loaders, e.g. random weights, gets the same check).
        let load = |name: WeightName| -> Result<HostTensor> {
            let want =
                c.weight_shape(name).ok_or_else(|| Error::format(format!("this model has no weight {name:?}")))?;
            let t = source.load(name)?;
            if t.shape != want {
                return Err(Error::format(format!("weight {name:?} has shape {:?}, expected {want:?}", t.shape)));
            }
            Ok(t)
        };
        let total = c.num_layers + 2;
        let embedding = load(WeightName::TokenEmbedding)?;
        let lm_head = if c.tie_word_embeddings { None } else { Some(backend.upload(load(WeightName::LmHead)?)?) };
        let embedding = backend.upload(embedding)?;
        progress(1, total);
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let w = |kind| WeightName::Layer(l, kind);
            let q = load(w(LayerWeight::Q))?;
            let k = load(w(LayerWeight::K))?;
            let v = load(w(LayerWeight::V))?;
            let qkv_bias = if c.attention_bias {
                let qb = load(w(LayerWeight::QBias))?;
                let kb = load(w(LayerWeight::KBias))?;
                let vb = load(w(LayerWeight::VBias))?;
                Some(backend.upload(concat_rows(vec![qb, kb, vb]))?)
            } else {
                None
            };
            let gate = load(w(LayerWeight::Gate))?;
            let up = load(w(LayerWeight::Up))?;
            let layer = Layer {
                attn_norm: backend.upload(load(w(LayerWeight::AttnNorm))?)?,
                qkv: backend.upload(concat_rows(vec![q, k, v]))?,
                qkv_bias,
                o: backend.upload(load(w(LayerWeight::O))?)?,
                ffn_norm: backend.upload(load(w(LayerWeight::FfnNorm))?)?,
                gate_up: backend.upload(concat_rows(vec![gate, up]))?,
                down: backend.upload(load(w(LayerWeight::Down))?)?,
            };
            layers.push(Layer::new(backend, layer)?);
            progress(l + 2, total);
        }
        let final_norm = backend.upload(load(WeightName::FinalNorm)?)?;
        progress(total, total);
        let unit_gain = unit_gain(backend, c.hidden_size)?;
        Ok(LlamaModel { config: c, embedding, layers, final_norm, lm_head, unit_gain })
    }

    /// A model of `config` with random weights made by the backend itself (no host copy), for
    /// benchmarks of models whose weights are not at hand. Linear weights are uniform with standard
    /// deviation 1/√in_features and norms near 1, so activations stay in range through the layers;
    /// the same `seed` gives the same weights on every backend (up to bf16 rounding).
    pub fn random(backend: &B, config: &ModelConfig, seed: u64) -> Result<Self> {
        let c = config.clone();
        c.validate()?;
        let (h, d) = (c.hidden_size, c.head_dim);
        let qkv_rows = (c.num_heads + 2 * c.num_kv_heads) * d;
        let mut index = 0u64;
        let mut random = |shape: Vec<usize>, mean: f32, spread: f32| {
            index += 1;
            backend.random_weight(shape, seed ^ index.wrapping_mul(0x2545_F491_4F6C_DD1D), mean, spread)
        };
        // Uniform on [-s, s] has standard deviation s/√3.
        let linear = |in_features: usize| (3.0 / in_features as f32).sqrt();
        let embedding = random(vec![c.vocab_size, h], 0.0, 1.0)?;
        let lm_head = if c.tie_word_embeddings { None } else { Some(random(vec![c.vocab_size, h], 0.0, linear(h))?) };
        let mut layers = Vec::with_capacity(c.num_layers);
        for _ in 0..c.num_layers {
            let layer = Layer {
                attn_norm: random(vec![h], 1.0, 0.1)?,
                qkv: random(vec![qkv_rows, h], 0.0, linear(h))?,
                qkv_bias: if c.attention_bias { Some(random(vec![qkv_rows], 0.0, 0.1)?) } else { None },
                o: random(vec![h, c.num_heads * d], 0.0, linear(c.num_heads * d))?,
                ffn_norm: random(vec![h], 1.0, 0.1)?,
                gate_up: random(vec![2 * c.intermediate_size, h], 0.0, linear(h))?,
                down: random(vec![h, c.intermediate_size], 0.0, linear(c.intermediate_size))?,
            };
            layers.push(Layer::new(backend, layer)?);
        }
        let final_norm = random(vec![h], 1.0, 0.1)?;
        let unit_gain = unit_gain(backend, h)?;
        Ok(LlamaModel { config: c, embedding, layers, final_norm, lm_head, unit_gain })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The layout of a fused QKV row.
    pub fn qkv_layout(&self) -> QkvLayout {
        QkvLayout {
            num_heads: self.config.num_heads,
            num_kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Allocates a KV cache of `num_blocks` blocks of `block_size` tokens per layer (and the
    /// padding block).
    pub fn alloc_kv_cache(&self, backend: &B, num_blocks: usize, block_size: usize) -> Result<KvCache<B>> {
        static NEXT_CACHE_ID: AtomicU64 = AtomicU64::new(0);
        let layout = PagedKvLayout {
            num_blocks: num_blocks + 1,
            block_size,
            num_kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        };
        let pools = (0..self.config.num_layers).map(|_| backend.alloc_kv_pool(layout)).collect::<Result<_>>()?;
        Ok(KvCache { layout, pools, id: NEXT_CACHE_ID.fetch_add(1, Ordering::Relaxed), seq_len_limit: None })
    }

    /// One forward step in `phase`: writes the step's keys and values into `cache` and returns
    /// the logits of its `logit_rows`, `[logit_rows, vocab]` (still being computed on a backend
    /// that runs asynchronously: read them with [`Backend::read_logits`]).
    pub fn forward(
        &self,
        backend: &B,
        phase: &B::Phase,
        cache: &mut KvCache<B>,
        step: &StepInput,
    ) -> Result<B::Activation> {
        if let Some(&t) = step.tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(Error::invalid(format!(
                "token id {t} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        if let Some(&p) = step.positions.iter().find(|&&p| p as usize >= self.config.max_position_embeddings) {
            return Err(Error::invalid(format!(
                "position {p} is beyond the model's context of {}",
                self.config.max_position_embeddings
            )));
        }
        let scope = self.scope(cache);
        backend.run_step(phase, step, scope, &mut |step| self.forward_prepared(backend, phase, cache, step))
    }

    /// What steps over `cache` run over besides their inputs.
    fn scope(&self, cache: &KvCache<B>) -> StepScope {
        StepScope {
            cache_id: cache.id,
            max_blocks_per_seq: cache.max_seq_len(&self.config).div_ceil(cache.layout.block_size),
            padding_block: cache.padding_block(),
            block_size: cache.layout.block_size,
        }
    }

    /// Runs `phase`'s kernels once before serving, at each of `budgets` (every budget the
    /// phase will be given), so that no request waits for a recording or a kernel's first load:
    /// for [`StepKind::Decode`] the backend's decode steps ([`Backend::recorded_batch_sizes`])
    /// for batches of up to `max_batch` sequences, whose rows all attend over the padding block,
    /// which they write (their logits are dropped); for [`StepKind::Prefill`] a one-token
    /// prompt there. Returns the decode batch sizes recorded.
    pub fn warm_up(
        &self,
        backend: &B,
        phase: &mut B::Phase,
        cache: &mut KvCache<B>,
        kind: StepKind,
        max_batch: usize,
        budgets: &[u32],
    ) -> Result<Vec<usize>> {
        let sizes = match kind {
            StepKind::Prefill => vec![1],
            StepKind::Decode => {
                let sizes = backend.recorded_batch_sizes();
                // A full batch takes the smallest size at least as large.
                let last = sizes.iter().position(|&b| b >= max_batch).unwrap_or(sizes.len().saturating_sub(1));
                sizes.into_iter().take(last + 1).collect()
            }
        };
        let scope = self.scope(cache);
        for &budget in budgets {
            backend.set_budget(phase, budget)?;
            for &b in &sizes {
                let padding = StepInput { kind, ..StepInput::default().padded_decode(b, 1, scope) };
                self.forward(backend, phase, cache, &padding)?;
            }
        }
        Ok(if kind == StepKind::Decode { sizes } else { Vec::new() })
    }

    /// The gain a layer's norm kernel runs with: `gain`, or ones where the backend folded it into
    /// the weight after the norm.
    fn norm_gain<'a>(&'a self, gain: &'a B::Weight) -> &'a B::Weight {
        self.unit_gain.as_ref().unwrap_or(gain)
    }

    /// The forward step over inputs already on the backend.
    fn forward_prepared(
        &self,
        backend: &B,
        phase: &B::Phase,
        cache: &mut KvCache<B>,
        step: &B::Step,
    ) -> Result<B::Activation> {
        let c = &self.config;
        let layout = self.qkv_layout();
        let rope = RopeConfig { theta: c.rope_theta, style: c.rope_style, scaling: c.rope_scaling };
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let eps = c.rms_norm_eps;

        let mut residual = backend.embedding(phase, &self.embedding, step)?;
        if backend.fuses_norms(phase, step) && !self.layers.is_empty() {
            // The residual adds and norms inside the GEMMs: two launches a layer fewer (five with
            // a backend that also runs the RoPE inside its attention, instead of eight). The
            // first layer's input norm has no GEMM before it to come from.
            let x = backend.rms_norm(phase, &residual, self.norm_gain(&self.layers[0].attn_norm), eps)?;
            for (l, (layer, pool)) in self.layers.iter().zip(cache.pools.iter_mut()).enumerate() {
                let bias = layer.qkv_bias.as_ref();
                let mut qkv = match l {
                    0 => backend.linear(phase, step, &x, &layer.qkv, bias)?,
                    _ => backend.linear_normalized(phase, step, &residual, &layer.qkv, bias, eps)?,
                };
                let attn = backend.rope_and_attention(phase, &mut qkv, layout, rope, pool, step, scale)?;
                backend.linear_add(phase, step, &attn, &layer.o, &mut residual)?;
                let act = backend.linear_silu_and_mul_normalized(phase, step, &residual, &layer.gate_up, eps)?;
                backend.linear_add(phase, step, &act, &layer.down, &mut residual)?;
            }
            let x = backend.rms_norm(phase, &residual, &self.final_norm, eps)?;
            return self.logits(backend, phase, step, &x);
        }
        let mut pending: Option<B::Activation> = None;
        for (layer, pool) in self.layers.iter().zip(cache.pools.iter_mut()) {
            let x = match &pending {
                None => backend.rms_norm(phase, &residual, self.norm_gain(&layer.attn_norm), eps)?,
                Some(out) => {
                    backend.fused_add_rms_norm(phase, out, &mut residual, self.norm_gain(&layer.attn_norm), eps)?
                }
            };
            let mut qkv = backend.linear(phase, step, &x, &layer.qkv, layer.qkv_bias.as_ref())?;
            let attn = backend.rope_and_attention(phase, &mut qkv, layout, rope, pool, step, scale)?;
            let attn_out = backend.linear(phase, step, &attn, &layer.o, None)?;
            let x =
                backend.fused_add_rms_norm(phase, &attn_out, &mut residual, self.norm_gain(&layer.ffn_norm), eps)?;
            let act = backend.linear_silu_and_mul(phase, step, &x, &layer.gate_up)?;
            pending = Some(backend.linear(phase, step, &act, &layer.down, None)?);
        }
        let x = match &pending {
            None => backend.rms_norm(phase, &residual, &self.final_norm, eps)?,
            Some(out) => backend.fused_add_rms_norm(phase, out, &mut residual, &self.final_norm, eps)?,
        };
        self.logits(backend, phase, step, &x)
    }

    /// The logits of the step's rows that want them, from the final norm's output `x`.
    fn logits(&self, backend: &B, phase: &B::Phase, step: &B::Step, x: &B::Activation) -> Result<B::Activation> {
        let rows = backend.gather_logit_rows(phase, x, step)?;
        backend.linear(phase, step, &rows, self.lm_head.as_ref().unwrap_or(&self.embedding), None)
    }
}
