//! The semantic cache in the request flow: after an exact miss, a tenant that opted in may be
//! answered by the entry of a paraphrase (same scope, similarity at or above its threshold,
//! same or newer purge generation, still fresh). Every failure (model missing, embedder slow,
//! Redis down) is counted and ends as an exact miss: this tier can only make a request slower.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use gateway_common::canonical::ParsedRequest;
use gateway_common::key::CacheKey;
use gateway_common::route::Route;
use gateway_common::tenant::{SemanticEmbedder, Tenant};
use sha2::{Digest, Sha256};

use super::{ApiRequest, CACHE_NAME, Hit, Reply, Service, Trace, render_entry};
use crate::budget::unix_now;
use crate::meter::Saving;
use crate::router::UpstreamBody;
use crate::semantic::embedder::LocalEmbedder;
use crate::semantic::index::{Index, Place};
use crate::semantic::order::Words;
use crate::semantic::pool::normalize;
use crate::semantic::scope::{self, Question};
use crate::settings::{Settings, ms};
use gateway_common::headers::{CacheOutcome, CacheStatusMember, Layer};
use gateway_common::usage::Tier;

/// The semantic tier of a [`Service`]: the local model (when it loaded) and one index per
/// vector width (the local model's, and each provider model's).
pub(super) struct Semantic {
    local: Option<LocalEmbedder>,
    indexes: Mutex<HashMap<usize, Arc<Index>>>,
    default_threshold: f32,
}

impl Semantic {
    pub(super) fn new(local: Option<LocalEmbedder>, default_threshold: f32) -> Semantic {
        Semantic {
            local,
            indexes: Mutex::new(HashMap::new()),
            default_threshold,
        }
    }

    fn index(&self, dim: usize) -> Arc<Index> {
        let mut indexes = self.indexes.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(
            indexes
                .entry(dim)
                .or_insert_with(|| Arc::new(Index::new(dim))),
        )
    }
}

/// A question embedded on a miss: written to the index once its answer is cached.
#[derive(Debug)]
pub(super) struct Pending {
    /// The embedder-qualified scope (`Place::scope`).
    scope: String,
    vector: Vec<f32>,
    /// The question's keyed words (`semantic/order.rs`), stored beside the vector.
    words: Words,
}

/// What the semantic lookup found.
pub(super) enum Found {
    /// A fresh entry of a paraphrase: the hit, its key, the similarity.
    Hit {
        hit: Box<Hit>,
        key: CacheKey,
        similarity: f32,
    },
    /// No match; the vector to index when the answer is cached (`None` when nothing to index).
    Miss(Option<Arc<Pending>>),
}

impl Service {
    /// The semantic lookup after an exact miss of `parsed` (whose canonical body is known).
    pub(super) async fn semantic_lookup(
        &self,
        tenant: &Arc<Tenant>,
        parsed: &ParsedRequest,
        generation: u64,
        now: u64,
        max_age: Option<u64>,
    ) -> Found {
        let Some(canonical) = &parsed.canonical else {
            return Found::Miss(None);
        };
        let question = match scope::question(&self.key_secret, &tenant.id, parsed.route, canonical)
        {
            Ok(question) => question,
            Err(reason) => {
                self.count_semantic("not_semantic", reason.label());
                return Found::Miss(None);
            }
        };
        let (tag, vector) = match self.embed(tenant, &question).await {
            Ok(embedded) => embedded,
            Err(reason) => {
                self.count_semantic("error", reason);
                return Found::Miss(None);
            }
        };
        let scope = format!("{tag}.{}", question.scope);
        let threshold = tenant
            .semantic
            .threshold
            .unwrap_or(self.semantic.default_threshold);
        let index = self.semantic.index(vector.len());
        let place = Place {
            tenant: &tenant.id,
            scope: &scope,
        };
        let pending = Arc::new(Pending {
            scope: scope.clone(),
            vector,
            words: question.words,
        });
        let found = index
            .nearest(
                &self.store,
                place,
                &pending.vector,
                &pending.words,
                generation,
                threshold,
            )
            .await;
        let candidate = match found {
            Ok(Some(candidate)) => candidate,
            Ok(None) => {
                self.count_semantic("miss", "below_threshold");
                return Found::Miss(Some(pending));
            }
            Err(_) => {
                self.count_semantic("error", "redis");
                return Found::Miss(None);
            }
        };
        let Some(key) = CacheKey::from_hex(&tenant.id, &candidate.member) else {
            self.count_semantic("error", "member");
            return Found::Miss(Some(pending));
        };
        let got = match self.store.get(&key.redis_key()).await {
            Ok(got) => got,
            Err(_) => {
                self.count_semantic("error", "redis");
                return Found::Miss(None);
            }
        };
        match self.decode(&key, got, now, max_age, generation) {
            (Some(hit), _) => {
                self.count_semantic("hit", "similar");
                Found::Hit {
                    hit: Box::new(hit),
                    key,
                    similarity: candidate.similarity,
                }
            }
            // Expired, purged or evicted since its vector was written.
            (None, _) => {
                self.count_semantic("miss", "entry_gone");
                Found::Miss(Some(pending))
            }
        }
    }

    /// Records `pending` for the entry just cached under `key` (best effort: a failed write
    /// only means this answer is not found by meaning).
    pub(super) async fn semantic_index(
        &self,
        tenant: &str,
        key: &CacheKey,
        pending: &Pending,
        generation: u64,
        ttl_secs: u64,
    ) {
        let index = self.semantic.index(pending.vector.len());
        let place = Place {
            tenant,
            scope: &pending.scope,
        };
        let outcome = index
            .insert(
                &*self.store,
                place,
                key.hex(),
                &pending.vector,
                &pending.words,
                generation,
                ttl_secs,
            )
            .await;
        if outcome.is_err() {
            self.count_semantic("error", "index_write");
        }
    }

    /// The vector of `question` and a tag naming its embedder (vectors of two models never
    /// share a scope), or an error label.
    async fn embed(
        &self,
        tenant: &Tenant,
        question: &Question,
    ) -> Result<(String, Vec<f32>), &'static str> {
        let started = Instant::now();
        let (label, result) = match &tenant.semantic.embedder {
            SemanticEmbedder::Local => {
                let Some(local) = &self.semantic.local else {
                    return Err("model_missing");
                };
                let result = local
                    .embed(question.text.clone())
                    .await
                    .map(|v| ("local".to_string(), v))
                    .map_err(|e| match e {
                        crate::semantic::embedder::EmbedderError::Timeout => "embed_timeout",
                        _ => "embed_failed",
                    });
                ("local", result)
            }
            SemanticEmbedder::Provider { model } => {
                let tag = hex::encode(&Sha256::digest(model.as_bytes())[..6]);
                let result = self
                    .provider_embedding(model, &question.text)
                    .await
                    .map(|v| (format!("p{tag}"), v));
                ("provider", result)
            }
        };
        self.metrics
            .semantic_embed_duration
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// `POST /v1/embeddings` through the provider router (failover and breakers included).
    async fn provider_embedding(&self, model: &str, text: &str) -> Result<Vec<f32>, &'static str> {
        let body = serde_json::json!({ "model": model, "input": text }).to_string();
        let upstream = self
            .router
            .send(
                Route::Embeddings,
                model,
                &Bytes::from(body),
                false,
                &crate::provider_api::Passthrough::default(),
            )
            .await
            .map_err(|_| "provider_failed")?;
        let UpstreamBody::Full(bytes) = upstream.body else {
            return Err("provider_failed");
        };
        if upstream.status != 200 {
            return Err("provider_failed");
        }
        let answer: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|_| "provider_answer")?;
        let vector: Vec<f32> = answer
            .pointer("/data/0/embedding")
            .and_then(|v| v.as_array())
            .ok_or("provider_answer")?
            .iter()
            .map(|x| x.as_f64().map(|x| x as f32))
            .collect::<Option<_>>()
            .ok_or("provider_answer")?;
        if vector.is_empty() {
            return Err("provider_answer");
        }
        Ok(normalize(vector))
    }

    /// Answers with a paraphrase's entry, and stores it under the request's own `key` too
    /// (then offers it to the edge tier like any new entry), so that the edge answers this
    /// exact question next time. `None` when the entry cannot answer this request (a stream
    /// asked of an entry that cannot be replayed).
    pub(super) async fn serve_semantic_hit(
        &self,
        tenant: &Tenant,
        request: &ApiRequest,
        parsed: &gateway_common::canonical::ParsedRequest,
        own: Option<&CacheKey>,
        hit: Hit,
        trace: &mut Trace,
    ) -> Option<Reply> {
        let Hit {
            entry,
            age,
            remaining,
        } = hit;
        let copy = own.map(|own| {
            let mut copy = entry.clone();
            copy.envelope.key = own.hex().to_string();
            (own.clone(), Arc::new(copy))
        });
        let provider = Arc::from(entry.envelope.provider.as_str());
        let saved = entry
            .envelope
            .usage
            .clone()
            .map(|usage| (entry.envelope.model.clone(), usage));
        let reply = render_entry(entry, request.route, parsed)?;
        trace.cache = Some(CacheOutcome::Hit);
        trace.layer = Some(Layer::Origin);
        trace.age = Some(age);
        trace.provider = Some(provider);
        trace.cache_status = Some(
            CacheStatusMember::hit(CACHE_NAME, remaining)
                .with_detail("semantic")
                .render(),
        );
        if let Some((model, usage)) = &saved {
            let saving = Saving {
                model,
                usage,
                times: 1,
            };
            self.meter
                .saved(&tenant.id, Tier::Origin, unix_now(), saving);
        }
        if let Some((own, copy)) = copy
            && let Ok(bytes) = self.sealer.seal(&copy)
        {
            // Kept only as long as the answering entry: same created-at and TTL.
            if self
                .store
                .set_ex(&own.redis_key(), bytes, remaining.max(1))
                .await
                .is_ok()
            {
                self.offer(copy).await;
            }
        }
        Some(reply)
    }

    fn count_semantic(&self, outcome: &str, reason: &str) {
        self.metrics
            .semantic_lookups
            .with_label_values(&[outcome, reason])
            .inc();
    }
}

/// The local model, when a tenant uses it; `None` (logged) when it is missing or broken, and
/// then those tenants' semantic lookups are counted errors served as exact misses.
pub(super) fn load_local_model(
    settings: &Settings,
    tenants_using_it: &usize,
) -> Option<LocalEmbedder> {
    if *tenants_using_it == 0 {
        return None;
    }
    let semantic = &settings.semantic;
    match LocalEmbedder::load(
        &semantic.model_dir,
        semantic.max_concurrent,
        ms(semantic.embed_timeout_ms),
    ) {
        Ok(local) => Some(local),
        Err(error) => {
            tracing::warn!(%error, "semantic model not loaded; semantic lookups are exact misses (run `just setup`)");
            None
        }
    }
}
