//! The origin regions and the order the edge tries them in (`edge_config.regions`, per POP),
//! and when to try the next one. Pure: no host calls, so it is tested on the host; only
//! `origin.rs` talks to a region's backend.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The region of the one-region setup: backend `origin`, as before regions existed.
pub const DEFAULT_REGION: &str = "default";
/// The backend of [`DEFAULT_REGION`], and the prefix of every other region's backend.
pub const DEFAULT_BACKEND: &str = "origin";

/// Longest region name (it goes into backend names and response headers).
const MAX_NAME: usize = 32;

/// One origin region: its name (`us`) and the backend the service declares for it
/// (`origin_us`; `origin` for [`DEFAULT_REGION`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub name: String,
    pub backend: String,
}

impl Region {
    pub fn named(name: &str) -> Region {
        let backend = if name == DEFAULT_REGION {
            DEFAULT_BACKEND.to_owned()
        } else {
            format!("{DEFAULT_BACKEND}_{name}")
        };
        Region {
            name: name.to_owned(),
            backend,
        }
    }
}

/// The parsed `regions` item: a default order and per-POP orders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionMap {
    default: Vec<String>,
    /// POP code (upper case) → order.
    pops: BTreeMap<String, Vec<String>>,
}

/// Why a `regions` value was refused (the edge then uses the one-region default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionsError {
    /// Not JSON of the expected shape (unknown fields included).
    Shape(String),
    /// An order with no region in it (`default`, or a POP's).
    EmptyOrder(String),
    /// A region name that is not 1 to 32 of `[a-z0-9_-]` starting with a letter.
    BadName(String),
    /// A POP code that is not 1 to 8 ASCII letters or digits.
    BadPop(String),
}

impl std::fmt::Display for RegionsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegionsError::Shape(e) => write!(f, "not a regions object: {e}"),
            RegionsError::EmptyOrder(of) => write!(f, "the order of {of} is empty"),
            RegionsError::BadName(name) => write!(f, "bad region name {name:?}"),
            RegionsError::BadPop(pop) => write!(f, "bad POP code {pop:?}"),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    default: Vec<String>,
    #[serde(default)]
    pops: BTreeMap<String, Vec<String>>,
}

impl RegionMap {
    /// One region, [`DEFAULT_REGION`] on backend `origin`: the setup without a `regions` item.
    pub fn single() -> RegionMap {
        RegionMap {
            default: vec![DEFAULT_REGION.to_owned()],
            pops: BTreeMap::new(),
        }
    }

    /// Parses `{"default":["us","eu"],"pops":{"LHR":["eu","us"]}}`. A region listed twice
    /// in one order keeps its first place.
    pub fn parse(json: &str) -> Result<RegionMap, RegionsError> {
        let raw: Raw =
            serde_json::from_str(json).map_err(|e| RegionsError::Shape(e.to_string()))?;
        let default = order(raw.default, "default")?;
        let mut pops = BTreeMap::new();
        for (pop, list) in raw.pops {
            let valid =
                !pop.is_empty() && pop.len() <= 8 && pop.bytes().all(|b| b.is_ascii_alphanumeric());
            if !valid {
                return Err(RegionsError::BadPop(pop));
            }
            let list = order(list, &pop)?;
            pops.insert(pop.to_ascii_uppercase(), list);
        }
        Ok(RegionMap { default, pops })
    }

    /// The regions to try for a request at `pop`, nearest first: the POP's own order, or
    /// the default one.
    pub fn order(&self, pop: Option<&str>) -> Vec<Region> {
        let list = pop
            .and_then(|pop| self.pops.get(&pop.trim().to_ascii_uppercase()))
            .unwrap_or(&self.default);
        list.iter().map(|name| Region::named(name)).collect()
    }
}

fn order(list: Vec<String>, of: &str) -> Result<Vec<String>, RegionsError> {
    let mut out: Vec<String> = Vec::with_capacity(list.len());
    for name in list {
        if !valid_name(&name) {
            return Err(RegionsError::BadName(name));
        }
        if !out.contains(&name) {
            out.push(name);
        }
    }
    if out.is_empty() {
        return Err(RegionsError::EmptyOrder(of.to_owned()));
    }
    Ok(out)
}

/// A region name fits a backend name, an RFC 8941 token and a header value.
fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= MAX_NAME
        && bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// What a backend's health check says (`Unknown` without one, and always under Viceroy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Unhealthy,
    Unknown,
}

/// The order to try: regions whose health check says they are down move to the end (still
/// tried, last: a health check can be wrong, and an answer late is better than none).
pub fn arrange(regions: Vec<Region>, health: impl Fn(&Region) -> Health) -> Vec<Region> {
    let (down, up): (Vec<Region>, Vec<Region>) = regions
        .into_iter()
        .partition(|region| health(region) == Health::Unhealthy);
    up.into_iter().chain(down).collect()
}

/// How one attempt at a region ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The origin answered with this status (its body not yet read).
    Answered(u16),
    /// No answer: connect refused or failed (`unreachable`), timed out (`timeout`), or not
    /// a usable HTTP response (`broken`).
    Failed(&'static str),
    /// The region's backend is not declared in the service.
    Undeclared,
}

impl Attempt {
    /// For `x-upstream-tried`.
    pub fn describe(self) -> String {
        match self {
            Attempt::Answered(status) => status.to_string(),
            Attempt::Failed(why) => why.to_owned(),
            Attempt::Undeclared => "undeclared".to_owned(),
        }
    }
}

/// Whether to try the next region after `attempt`: on no answer, and on a 5xx, which the
/// client has not seen (the edge commits an answer only once its status is known). A 4xx
/// is the answer: the request itself is wrong, and every region would say so.
pub fn fail_over(attempt: Attempt) -> bool {
    match attempt {
        Attempt::Answered(status) => status >= 500,
        Attempt::Failed(_) | Attempt::Undeclared => true,
    }
}

/// `x-upstream-tried`: `us=unreachable, eu=200`.
pub fn render_tried(tried: &[(String, Attempt)]) -> String {
    tried
        .iter()
        .map(|(region, attempt)| format!("{region}={}", attempt.describe()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(regions: &[Region]) -> Vec<&str> {
        regions.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn each_pop_gets_its_own_order_and_any_other_pop_the_default() {
        let map =
            RegionMap::parse(r#"{"default":["us","eu"],"pops":{"LHR":["eu","us"],"fra":["eu"]}}"#)
                .unwrap();
        assert_eq!(names(&map.order(Some("LHR"))), ["eu", "us"]);
        assert_eq!(
            names(&map.order(Some("lhr"))),
            ["eu", "us"],
            "POP codes ignore case"
        );
        assert_eq!(names(&map.order(Some("FRA"))), ["eu"]);
        assert_eq!(names(&map.order(Some("JFK"))), ["us", "eu"]);
        assert_eq!(names(&map.order(None)), ["us", "eu"]);
        assert_eq!(map.order(Some("LHR"))[0].backend, "origin_eu");
    }

    #[test]
    fn without_a_regions_item_the_one_region_is_the_origin_backend() {
        let order = RegionMap::single().order(Some("LHR"));
        assert_eq!(
            order,
            [Region {
                name: "default".into(),
                backend: "origin".into()
            }]
        );
    }

    #[test]
    fn a_region_listed_twice_keeps_its_first_place() {
        let map = RegionMap::parse(r#"{"default":["us","eu","us"]}"#).unwrap();
        assert_eq!(names(&map.order(None)), ["us", "eu"]);
    }

    #[test]
    fn bad_values_are_refused_with_what_is_wrong() {
        let err = |json: &str| RegionMap::parse(json).unwrap_err();
        assert!(matches!(err("not json"), RegionsError::Shape(_)));
        assert!(matches!(err(r#"{"default":"us"}"#), RegionsError::Shape(_)));
        assert!(matches!(
            err(r#"{"default":["us"],"extra":1}"#),
            RegionsError::Shape(_)
        ));
        assert_eq!(
            err(r#"{"default":[]}"#),
            RegionsError::EmptyOrder("default".into())
        );
        assert_eq!(
            err(r#"{"default":["us"],"pops":{"LHR":[]}}"#),
            RegionsError::EmptyOrder("LHR".into())
        );
        assert_eq!(
            err(r#"{"default":["US"]}"#),
            RegionsError::BadName("US".into())
        );
        assert_eq!(
            err(r#"{"default":["us east"]}"#),
            RegionsError::BadName("us east".into())
        );
        assert_eq!(
            err(r#"{"default":["us"],"pops":{"L-R":["us"]}}"#),
            RegionsError::BadPop("L-R".into())
        );
    }

    #[test]
    fn a_region_whose_health_check_fails_is_tried_last() {
        let map = RegionMap::parse(r#"{"default":["us","eu","ap"]}"#).unwrap();
        let health = |r: &Region| match r.name.as_str() {
            "us" => Health::Unhealthy,
            "eu" => Health::Unknown,
            _ => Health::Healthy,
        };
        assert_eq!(names(&arrange(map.order(None), health)), ["eu", "ap", "us"]);
    }

    #[test]
    fn the_edge_fails_over_on_no_answer_and_on_a_5xx_but_not_on_a_4xx() {
        for failure in ["unreachable", "timeout", "broken"] {
            assert!(fail_over(Attempt::Failed(failure)), "{failure}");
        }
        assert!(fail_over(Attempt::Undeclared));
        for status in [500, 502, 503, 504] {
            assert!(fail_over(Attempt::Answered(status)), "{status}");
        }
        for status in [200, 400, 401, 404, 429] {
            assert!(!fail_over(Attempt::Answered(status)), "{status}");
        }
    }

    #[test]
    fn the_tried_header_lists_each_region_with_its_outcome() {
        let tried = [
            ("us".to_owned(), Attempt::Failed("unreachable")),
            ("eu".to_owned(), Attempt::Answered(200)),
        ];
        assert_eq!(render_tried(&tried), "us=unreachable, eu=200");
    }
}
