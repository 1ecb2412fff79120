//! The router's unit tests: candidate order, weights, model rewriting, URLs, the retry budget
//! and failover.

use super::*;

fn provider(name: &str, priority: u32, weight: u32, models: &[(&str, &str)]) -> ProviderSettings {
    ProviderSettings {
        name: name.into(),
        base_url: "http://127.0.0.1:1/v1/".into(),
        base_url_env: None,
        api_key_env: None,
        api_key: None,
        models: models
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        apis: crate::provider_api::ProviderApi::default_set(),
        priority,
        weight,
        timeout_ms: 100,
        connect_timeout_ms: 100,
    }
}

fn router(providers: &[ProviderSettings]) -> Router {
    let settings = crate::settings::Settings::for_tests().router;
    Router::new(providers, &settings, 1024, Metrics::new().unwrap()).unwrap()
}

#[test]
fn candidates_follow_priority_and_only_serving_providers() {
    let r = router(&[
        provider("b", 1, 1, &[("m", "m")]),
        provider("a", 0, 1, &[("m", "m-a")]),
        provider("c", 0, 1, &[("other", "other")]),
        provider("any", 2, 1, &[("*", "*")]),
    ]);
    let names: Vec<String> = r
        .candidates(ProviderApi::Chat, "m")
        .iter()
        .map(|p| p.name.to_string())
        .collect();
    assert_eq!(names, ["a", "b", "any"]);
    assert!(
        r.candidates(ProviderApi::Chat, "zzz")
            .iter()
            .all(|p| &*p.name == "any")
    );
    assert_eq!(r.models(), ["m", "other"]);
}

#[test]
fn only_providers_that_serve_a_routes_api_are_candidates() {
    let mut anthropic = provider("anthropic", 0, 1, &[("m", "m")]);
    anthropic.apis = vec![ProviderApi::Messages];
    let r = router(&[provider("openai", 0, 1, &[("m", "m")]), anthropic]);
    let names = |api| -> Vec<String> {
        r.candidates(api, "m")
            .iter()
            .map(|p| p.name.to_string())
            .collect()
    };
    assert_eq!(names(ProviderApi::Messages), ["anthropic"]);
    assert_eq!(names(ProviderApi::Chat), ["openai"]);
    assert!(names(ProviderApi::Responses).is_empty());
}

#[test]
fn weights_split_traffic_within_a_priority() {
    let r = router(&[
        provider("heavy", 0, 9, &[("m", "m")]),
        provider("light", 0, 1, &[("m", "m")]),
    ]);
    let heavy_first = (0..1000)
        .filter(|_| &*r.candidates(ProviderApi::Chat, "m")[0].name == "heavy")
        .count();
    assert!((800..=980).contains(&heavy_first), "{heavy_first}");
}

#[test]
fn the_model_is_rewritten_without_touching_other_members() {
    let out = rewrite_model(
        br#"{"model":"a","temperature":0.10000000000000001,"n":1e2}"#,
        "b",
    )
    .unwrap();
    assert_eq!(
        &out[..],
        br#"{"model":"b","n":1e2,"temperature":0.10000000000000001}"#
    );
}

#[test]
fn the_url_joins_the_base_and_the_route() {
    let r = router(&[provider("a", 0, 1, &[("m", "m")])]);
    assert_eq!(
        r.providers[0].url(Route::ChatCompletions),
        "http://127.0.0.1:1/v1/chat/completions"
    );
}

#[test]
fn the_retry_budget_allows_the_floor_then_a_share_of_requests() {
    let b = RetryBudget::new(0.5, 0.0);
    assert!(!b.try_withdraw());
    b.deposit();
    assert!(!b.try_withdraw());
    b.deposit();
    assert!(b.try_withdraw());
    let floor = RetryBudget::new(0.0, 2.0);
    assert!(floor.try_withdraw());
    assert!(floor.try_withdraw());
    assert!(!floor.try_withdraw());
}

#[tokio::test]
async fn an_unreachable_provider_fails_over_then_exhausts() {
    let r = router(&[
        provider("a", 0, 1, &[("m", "m")]),
        provider("b", 1, 1, &[("m", "m")]),
    ]);
    let err = r
        .send(
            Route::ChatCompletions,
            "m",
            &Bytes::from_static(b"{}"),
            false,
            &Passthrough::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, RouterError::Exhausted { attempts: 2, .. }),
        "{err:?}"
    );
    assert!(matches!(
        r.send(
            Route::ChatCompletions,
            "x",
            &Bytes::new(),
            false,
            &Passthrough::default()
        )
        .await,
        Err(RouterError::NoProvider(_))
    ));
}
