//! all-MiniLM-L6-v2's encoder: BERT's forward pass (Hugging Face `BertModel`, absolute
//! positions, exact GELU) for one text, on plain `f32` slices. It owns the weights and the
//! arithmetic only: word pieces come from `embed.rs`'s tokenizer, pooling from `pool.rs`.
//!
//! Written for one question of a few to a few hundred word pieces rather than taken from a
//! general tensor library: there, every multiply packed its weights anew and every step
//! allocated a tensor, which made a 7-word question cost ~20 ms of one core. Here each weight
//! row is read once per call (`linear.rs`) and a short question costs a few milliseconds.

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::linear::Linear;

/// Why the model files could not be turned into an encoder.
#[derive(Debug, thiserror::Error)]
pub enum BertError {
    #[error("config: {0}")]
    Config(String),
    #[error("weights: {0}")]
    Weights(#[from] safetensors::SafeTensorError),
    #[error("tensor {name}: {reason}")]
    Tensor { name: String, reason: String },
}

/// The fields of `config.json` the forward pass depends on; anything it does not implement
/// (another activation, relative positions) is refused at load rather than computed wrongly.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub intermediate_size: usize,
    pub layer_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub vocab_size: usize,
    pub hidden_act: String,
    #[serde(default = "absolute")]
    pub position_embedding_type: String,
}

fn absolute() -> String {
    "absolute".to_owned()
}

/// The loaded encoder.
pub struct Bert {
    hidden: usize,
    heads: usize,
    words: Vec<f32>,
    positions: Vec<f32>,
    types: Vec<f32>,
    embedding_norm: Norm,
    layers: Vec<Layer>,
}

impl Bert {
    /// Builds the encoder from a `model.safetensors` image (names as sentence-transformers
    /// saves them, with or without a `bert.` prefix) and its `config.json`.
    pub fn load(config: &Config, safetensors: &[u8]) -> Result<Bert, BertError> {
        if config.hidden_act != "gelu" {
            return Err(BertError::Config(format!(
                "hidden_act {:?}: only \"gelu\" (exact, erf) is implemented",
                config.hidden_act
            )));
        }
        if config.position_embedding_type != "absolute" {
            return Err(BertError::Config(format!(
                "position_embedding_type {:?}: only \"absolute\" is implemented",
                config.position_embedding_type
            )));
        }
        let hidden = config.hidden_size;
        if config.num_attention_heads == 0 || !hidden.is_multiple_of(config.num_attention_heads) {
            return Err(BertError::Config(format!(
                "hidden_size {hidden} is not a multiple of {} heads",
                config.num_attention_heads
            )));
        }
        let tensors = Tensors {
            file: SafeTensors::deserialize(safetensors)?,
            eps: config.layer_norm_eps as f32,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| tensors.layer(&format!("encoder.layer.{i}"), config))
            .collect::<Result<_, _>>()?;
        Ok(Bert {
            hidden,
            heads: config.num_attention_heads,
            words: tensors.matrix(
                "embeddings.word_embeddings.weight",
                config.vocab_size,
                hidden,
            )?,
            positions: tensors.matrix(
                "embeddings.position_embeddings.weight",
                config.max_position_embeddings,
                hidden,
            )?,
            types: tensors.matrix(
                "embeddings.token_type_embeddings.weight",
                config.type_vocab_size,
                hidden,
            )?,
            embedding_norm: tensors.norm("embeddings.LayerNorm", hidden)?,
            layers,
        })
    }

    /// The width of a hidden state row: the embedding's dimensions.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// The last hidden state: one row of `hidden_size` values per word piece. `None` when an
    /// id or a type id is outside the vocabulary, or there are more pieces than positions.
    /// Every piece attends to every other (one unpadded text, so no mask).
    pub fn forward(&self, ids: &[u32], type_ids: &[u32]) -> Option<Vec<f32>> {
        let h = self.hidden;
        if ids.len() != type_ids.len() || ids.len() * h > self.positions.len() {
            return None;
        }
        let mut x = Vec::with_capacity(ids.len() * h);
        for (i, (&id, &ty)) in ids.iter().zip(type_ids).enumerate() {
            let word = self.words.get(id as usize * h..(id as usize + 1) * h)?;
            let ty = self.types.get(ty as usize * h..(ty as usize + 1) * h)?;
            let position = &self.positions[i * h..(i + 1) * h];
            x.extend(
                word.iter()
                    .zip(position)
                    .zip(ty)
                    .map(|((w, p), t)| w + p + t),
            );
        }
        self.embedding_norm.apply(&mut x);
        for layer in &self.layers {
            x = layer.forward(x, self.heads);
        }
        Some(x)
    }
}

/// One encoder block: self-attention then the feed-forward network, each followed by a
/// residual sum and a layer norm (post-norm, as BERT is).
struct Layer {
    /// Query, key and value projections stacked into one `3·hidden × hidden` matrix: one pass
    /// over the input for the three.
    qkv: Linear,
    attention_out: Linear,
    attention_norm: Norm,
    up: Linear,
    down: Linear,
    output_norm: Norm,
}

impl Layer {
    fn forward(&self, x: Vec<f32>, heads: usize) -> Vec<f32> {
        let hidden = self.attention_out.outputs();
        let qkv = self.qkv.forward(&x);
        let context = attend(&qkv, hidden, heads);
        let mut attended = self.attention_out.forward(&context);
        attended.iter_mut().zip(&x).for_each(|(a, r)| *a += r);
        self.attention_norm.apply(&mut attended);

        let inner = self.up.forward_then(&attended, gelu);
        let mut out = self.down.forward(&inner);
        out.iter_mut().zip(&attended).for_each(|(o, r)| *o += r);
        self.output_norm.apply(&mut out);
        out
    }
}

/// Scaled dot-product attention over rows of `[query | key | value]`, head by head; returns
/// one row of `hidden` values per piece. Both products go through `Linear`'s kernel: the keys
/// as the weight rows of the scores, the transposed values as those of the context.
fn attend(qkv: &[f32], hidden: usize, heads: usize) -> Vec<f32> {
    let width = hidden / heads;
    let scale = 1.0 / (width as f32).sqrt();
    let rows: Vec<&[f32]> = qkv.chunks_exact(3 * hidden).collect();
    let n = rows.len();
    let mut context = vec![0f32; n * hidden];
    if n == 0 || width == 0 {
        return context;
    }
    for head in 0..heads {
        let at = |offset: usize| offset + head * width..offset + (head + 1) * width;
        let gather = |offset: usize| -> Vec<f32> {
            rows.iter().flat_map(|r| &r[at(offset)]).copied().collect()
        };
        let mut values_by_column = vec![0f32; width * n];
        for (i, r) in rows.iter().enumerate() {
            for (c, v) in r[at(2 * hidden)].iter().enumerate() {
                values_by_column[c * n + i] = *v;
            }
        }
        #[allow(
            clippy::expect_used,
            reason = "n keys of width values, and width columns of n values, are the shapes \
                      Linear::new checks"
        )]
        let (keys, values) = (
            Linear::new(gather(hidden), vec![0.0; n], width).expect("n × width keys"),
            Linear::new(values_by_column, vec![0.0; width], n).expect("width × n values"),
        );
        let mut scores = keys.forward(&gather(0));
        for row in scores.chunks_exact_mut(n) {
            row.iter_mut().for_each(|s| *s *= scale);
            softmax(row);
        }
        let mixed = values.forward(&scores);
        for (out, part) in context
            .chunks_exact_mut(hidden)
            .zip(mixed.chunks_exact(width))
        {
            out[at(0)].copy_from_slice(part);
        }
    }
    context
}

fn softmax(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    v.iter_mut().for_each(|x| {
        *x = (*x - max).exp();
        sum += *x;
    });
    v.iter_mut().for_each(|x| *x /= sum);
}

/// GELU as BERT defines it: `x·Φ(x)`, with the exact normal CDF (erf), not the tanh
/// approximation. In single precision: the model's arithmetic is `f32` throughout, and the
/// double-precision erf made GELU a third of a long question's time.
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Layer normalisation over each row of `gamma.len()` values.
struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

impl Norm {
    fn apply(&self, x: &mut [f32]) {
        let n = self.gamma.len() as f32;
        for row in x.chunks_exact_mut(self.gamma.len()) {
            let mean = row.iter().sum::<f32>() / n;
            let variance = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
            let inverse = 1.0 / (variance + self.eps).sqrt();
            for ((v, g), b) in row.iter_mut().zip(&self.gamma).zip(&self.beta) {
                *v = (*v - mean) * inverse * g + b;
            }
        }
    }
}

/// The safetensors image, read by name.
struct Tensors<'a> {
    file: SafeTensors<'a>,
    eps: f32,
}

impl Tensors<'_> {
    /// A `rows × columns` f32 matrix under `name` or `bert.name`.
    fn matrix(&self, name: &str, rows: usize, columns: usize) -> Result<Vec<f32>, BertError> {
        self.floats(name, &[rows, columns])
    }

    /// A vector of `len` f32 under `name` or `bert.name`.
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, BertError> {
        self.floats(name, &[len])
    }

    fn floats(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, BertError> {
        let fail = |reason: String| BertError::Tensor {
            name: name.to_owned(),
            reason,
        };
        let view = self
            .file
            .tensor(name)
            .or_else(|_| self.file.tensor(&format!("bert.{name}")))
            .map_err(|e| fail(e.to_string()))?;
        if view.dtype() != Dtype::F32 {
            return Err(fail(format!("dtype {:?}, expected F32", view.dtype())));
        }
        if view.shape() != shape {
            return Err(fail(format!(
                "shape {:?}, expected {shape:?}",
                view.shape()
            )));
        }
        Ok(view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    fn linear(&self, name: &str, outputs: usize, inputs: usize) -> Result<Linear, BertError> {
        let weight = self.matrix(&format!("{name}.weight"), outputs, inputs)?;
        let bias = self.vector(&format!("{name}.bias"), outputs)?;
        Linear::new(weight, bias, inputs).ok_or_else(|| BertError::Tensor {
            name: name.to_owned(),
            reason: "weight and bias disagree".to_owned(),
        })
    }

    fn norm(&self, name: &str, width: usize) -> Result<Norm, BertError> {
        Ok(Norm {
            gamma: self.vector(&format!("{name}.weight"), width)?,
            beta: self.vector(&format!("{name}.bias"), width)?,
            eps: self.eps,
        })
    }

    fn layer(&self, prefix: &str, config: &Config) -> Result<Layer, BertError> {
        let h = config.hidden_size;
        let mut weight = Vec::with_capacity(3 * h * h);
        let mut bias = Vec::with_capacity(3 * h);
        for part in ["query", "key", "value"] {
            let name = format!("{prefix}.attention.self.{part}");
            weight.extend(self.matrix(&format!("{name}.weight"), h, h)?);
            bias.extend(self.vector(&format!("{name}.bias"), h)?);
        }
        let qkv = Linear::new(weight, bias, h).ok_or_else(|| BertError::Tensor {
            name: format!("{prefix}.attention.self"),
            reason: "query, key and value disagree".to_owned(),
        })?;
        Ok(Layer {
            qkv,
            attention_out: self.linear(&format!("{prefix}.attention.output.dense"), h, h)?,
            attention_norm: self.norm(&format!("{prefix}.attention.output.LayerNorm"), h)?,
            up: self.linear(
                &format!("{prefix}.intermediate.dense"),
                config.intermediate_size,
                h,
            )?,
            down: self.linear(
                &format!("{prefix}.output.dense"),
                h,
                config.intermediate_size,
            )?,
            output_norm: self.norm(&format!("{prefix}.output.LayerNorm"), h)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(hidden_act: &str) -> Config {
        Config {
            hidden_size: 4,
            num_attention_heads: 2,
            num_hidden_layers: 1,
            intermediate_size: 8,
            layer_norm_eps: 1e-12,
            max_position_embeddings: 8,
            type_vocab_size: 2,
            vocab_size: 10,
            hidden_act: hidden_act.to_owned(),
            position_embedding_type: absolute(),
        }
    }

    #[test]
    fn what_the_forward_pass_does_not_implement_is_refused_at_load() {
        let empty =
            safetensors::serialize(Vec::<(&str, safetensors::tensor::TensorView)>::new(), None)
                .unwrap();
        let err = Bert::load(&config("gelu_new"), &empty).err().unwrap();
        assert!(err.to_string().contains("gelu_new"), "{err}");
        let mut relative = config("gelu");
        relative.position_embedding_type = "relative_key".to_owned();
        assert!(matches!(
            Bert::load(&relative, &empty),
            Err(BertError::Config(_))
        ));
        // A missing tensor is named.
        let err = Bert::load(&config("gelu"), &empty).err().unwrap();
        assert!(err.to_string().contains("encoder.layer.0"), "{err}");
        assert!(matches!(
            Bert::load(&config("gelu"), b"not a safetensors file"),
            Err(BertError::Weights(_))
        ));
    }

    #[test]
    fn gelu_is_the_exact_one() {
        // x·Φ(x) at a few points (Φ from the normal table): the tanh form differs by ~1e-4 at 1.
        for (x, want) in [
            (0.0, 0.0),
            (1.0, 0.841_344_7),
            (-1.0, -0.158_655_3),
            (3.0, 2.995_95),
        ] {
            assert!((gelu(x) - want).abs() < 1e-5, "gelu({x}) = {}", gelu(x));
        }
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_the_order() {
        let mut v = [1.0, 3.0, 2.0];
        softmax(&mut v);
        assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(v[1] > v[2] && v[2] > v[0]);
        // Shifted by the maximum first, so a large score does not overflow.
        let mut w = [1000.0, 0.0];
        softmax(&mut w);
        assert_eq!(w, [1.0, 0.0]);
    }

    #[test]
    fn layer_norm_centres_and_scales_each_row() {
        let norm = Norm {
            gamma: vec![2.0, 2.0],
            beta: vec![1.0, 1.0],
            eps: 0.0,
        };
        let mut x = [3.0, 5.0, -1.0, 1.0];
        norm.apply(&mut x);
        assert_eq!(x, [-1.0, 3.0, -1.0, 3.0]);
    }

    #[test]
    fn one_piece_attends_only_to_itself() {
        // With one row the softmax weight is 1, so the context is the value.
        let hidden = 4;
        let qkv = [
            0.3, -2.0, 1.0, 4.0, 9.0, 9.0, 9.0, 9.0, 0.5, 0.25, -1.0, 2.0,
        ];
        assert_eq!(attend(&qkv, hidden, 2), vec![0.5, 0.25, -1.0, 2.0]);
    }
}
