//! Several origin regions behind one edge, for one test: each region is its own Redis and its
//! own origin (in-process, on a port chosen up front so the regions can name each other as
//! peers), reached from the edge through its own delay proxy (the distance to that region).
//! One mock provider serves every region, so a test counts provider calls across regions.
//! A region's origin or its proxy can be stopped and started again on the same port.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use anyhow::Context;
use gateway_fixtures::{
    DelayProxy, MockProvider, ProviderConfig, RedisDeployment, RedisKind, free_port,
};
use gateway_origin::settings::{PeerSettings, Secret, Settings};
use gateway_origin::{Application, Parts};
use serde_json::Value;

use crate::edge::{Edge, EdgeConfig};
use crate::stack::{SECRET, chat_body, origin_settings, post};

/// The secret the regions of a test stack send each other.
pub const PEER_TOKEN: &str = "e2e-region-peer-token-0123456789";

/// One region as a test wants it: its name and its distance (one way) from the edge.
#[derive(Debug, Clone)]
pub struct RegionSpec {
    pub name: String,
    pub distance: Duration,
}

impl RegionSpec {
    pub fn new(name: &str, distance: Duration) -> RegionSpec {
        RegionSpec {
            name: name.to_owned(),
            distance,
        }
    }
}

/// A running region: its Redis, its origin and the proxy the edge reaches it through.
pub struct Region {
    pub name: String,
    pub redis: RedisDeployment,
    settings: Settings,
    origin_port: u16,
    origin: Option<ServerHandle>,
    proxy_addr: SocketAddr,
    distance: Duration,
    proxy: Option<DelayProxy>,
    /// Requests the proxy forwarded across its earlier lives (a restart starts it at 0).
    proxied_before: u64,
    /// Requests forwarded before the stack was ready (Viceroy's probes), not the test's.
    baseline: u64,
}

impl Region {
    /// `http://127.0.0.1:<port>` of the origin, straight (not through the proxy).
    pub fn origin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.origin_port)
    }

    /// `http://127.0.0.1:<port>` of the proxy the edge uses for this region.
    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.proxy_addr)
    }

    /// Requests the edge sent to this region (through its proxy), over every proxy restart.
    pub fn requests(&self) -> u64 {
        (self.proxied_before + self.proxy.as_ref().map_or(0, DelayProxy::requests))
            .saturating_sub(self.baseline)
    }

    /// Stops the origin; its proxy stays up and answers 502 (a 5xx from the region).
    pub async fn stop_origin(&mut self) {
        if let Some(handle) = self.origin.take() {
            handle.stop(false).await;
        }
    }

    /// Starts the origin again on its port, with its settings and its Redis (what the Redis
    /// holds, the outboxes to its peers included, carries over).
    pub async fn start_origin(&mut self) -> anyhow::Result<()> {
        if self.origin.is_some() {
            return Ok(());
        }
        let app = Application::build_with(self.settings.clone(), Parts::default())
            .with_context(|| format!("region {} origin builds", self.name))?;
        self.origin = Some(app.handle());
        tokio::spawn(app.run());
        Ok(())
    }

    /// Stops the proxy: the region's address refuses connections (a connect failure).
    pub async fn stop_proxy(&mut self) {
        if let Some(proxy) = self.proxy.take() {
            self.proxied_before += proxy.requests();
            proxy.stop().await;
        }
    }

    /// Starts the proxy again where the edge expects it.
    pub async fn start_proxy(&mut self) -> anyhow::Result<()> {
        if self.proxy.is_none() {
            self.proxy = Some(
                DelayProxy::start_at(self.proxy_addr, self.origin_url(), self.distance).await?,
            );
        }
        Ok(())
    }

    /// Metric `name` on this region's `/metrics` page (labels as in
    /// [`crate::replicas::metric_where`]); 0 when absent or the origin is down.
    pub async fn metric(&self, http: &reqwest::Client, name: &str, labels: &[&str]) -> f64 {
        let Ok(resp) = http
            .get(format!("{}/metrics", self.origin_url()))
            .send()
            .await
        else {
            return 0.0;
        };
        let page = resp.text().await.unwrap_or_default();
        crate::replicas::metric_where(&page, name, labels)
    }
}

/// Every region and the edge in front of them.
pub struct RegionStack {
    pub provider: MockProvider,
    /// In the edge's default order: the first is the nearest.
    pub regions: Vec<Region>,
    pub edge: Edge,
    pub http: reqwest::Client,
}

impl RegionStack {
    /// Starts `specs` (each region peering with every other) and an edge whose default
    /// order is the order of `specs`.
    pub async fn start(specs: &[RegionSpec]) -> anyhow::Result<RegionStack> {
        RegionStack::start_at_pop(specs, None).await
    }

    /// As [`RegionStack::start`], with an edge at POP `pop.0` whose own order there is
    /// `pop.1` (`edge_config.pop` and `regions.pops`).
    pub async fn start_at_pop(
        specs: &[RegionSpec],
        pop: Option<(&str, &[&str])>,
    ) -> anyhow::Result<RegionStack> {
        let provider = MockProvider::start(ProviderConfig::default()).await?;
        let mut ports = Vec::new();
        for _ in specs {
            ports.push(free_port()?);
        }
        let mut regions = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            // One node per region: the cluster runs of the suite cover the store itself.
            let redis = RedisDeployment::start(RedisKind::Single)?;
            let mut settings = origin_settings(&redis, &[&provider]);
            settings.server.listen = format!("127.0.0.1:{}", ports[i]);
            settings.region.name = spec.name.clone();
            settings.region.peer_token = Some(Secret::new(PEER_TOKEN));
            settings.region.peer_retry_ms = 200;
            settings.region.peers = specs
                .iter()
                .zip(&ports)
                .filter(|(peer, _)| peer.name != spec.name)
                .map(|(peer, port)| PeerSettings {
                    name: peer.name.clone(),
                    url: format!("http://127.0.0.1:{port}"),
                })
                .collect();
            let proxy =
                DelayProxy::start(format!("http://127.0.0.1:{}", ports[i]), spec.distance).await?;
            let mut region = Region {
                name: spec.name.clone(),
                redis,
                settings,
                origin_port: ports[i],
                origin: None,
                proxy_addr: proxy.addr(),
                distance: spec.distance,
                proxy: Some(proxy),
                proxied_before: 0,
                baseline: 0,
            };
            region.start_origin().await?;
            regions.push(region);
        }
        let first = regions.first().context("at least one region")?;
        let mut config = EdgeConfig::new(first.proxy_url(), SECRET);
        config.regions = regions
            .iter()
            .map(|r| (r.name.clone(), r.proxy_url()))
            .collect();
        let names: Vec<&str> = regions.iter().map(|r| r.name.as_str()).collect();
        let mut order = serde_json::json!({ "default": names });
        if let Some((code, list)) = pop {
            order["pops"] = serde_json::json!({ code: list });
            config.pop = Some(code.to_owned());
        }
        config.regions_order = Some(order.to_string());
        let edge = tokio::task::spawn_blocking(move || Edge::start(&config)).await??;
        // Viceroy may probe its backends at start-up: counts start after that.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for region in &mut regions {
            region.baseline = region.requests();
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        Ok(RegionStack {
            provider,
            regions,
            edge,
            http,
        })
    }

    /// The region called `name`. Panics when there is none (a test failure).
    pub fn region(&mut self, name: &str) -> &mut Region {
        self.regions
            .iter_mut()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no region {name}"))
    }

    pub async fn edge_chat(&self, key: &str, prompt: &str) -> reqwest::Response {
        post(
            &self.http,
            &self.edge.url(),
            "/v1/chat/completions",
            key,
            &chat_body(prompt),
            &[],
        )
        .await
    }

    /// A chat request straight to region `index`'s origin.
    pub async fn origin_chat(&self, index: usize, key: &str, prompt: &str) -> reqwest::Response {
        post(
            &self.http,
            &self.regions[index].origin_url(),
            "/v1/chat/completions",
            key,
            &chat_body(prompt),
            &[],
        )
        .await
    }

    /// A DELETE with `key` as the bearer token to region `index`'s origin, and its JSON body.
    pub async fn origin_delete(&self, index: usize, key: &str, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .delete(format!("{}{path}", self.regions[index].origin_url()))
            .bearer_auth(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("DELETE {path} failed: {e}"));
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or_default())
    }

    /// Waits (at most `within`) until region `index`'s Redis answers `args` with `expected`.
    pub async fn wait_for_redis(
        &self,
        index: usize,
        args: &[&str],
        expected: &str,
        within: Duration,
    ) {
        let deadline = Instant::now() + within;
        loop {
            let got = self.regions[index].redis.cli(args);
            if got.as_deref().is_ok_and(|v| v == expected) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "region {}: {args:?} is {got:?}, not {expected:?}, after {within:?}",
                self.regions[index].name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
