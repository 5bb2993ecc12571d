//! The load itself: an open loop that, every millisecond, sends the events and GETs the
//! scenario's rates say are due by then, whether or not earlier ones have been answered.
//! Events go to `POST /v1/events` or, for Kafka scenarios, to the topic; each is spread over
//! the users with a stride and carries an id the subscribers' pushes are matched against.

use std::time::{Duration, Instant};

use rdkafka::producer::{BaseProducer, BaseRecord};
use serde_json::json;

use super::server::rss_kib;
use super::state::{slot, user_name, Progress, Shared, FAILED};
use crate::scenario::Scenario;

/// What the load leaves for the report, besides the shared state.
#[derive(Debug, Clone, Default)]
pub(super) struct Load {
    /// Seconds the load actually ran.
    pub(super) load_secs: f64,
    pub(super) events_sent: u64,
    /// Events sent in each second of the load.
    pub(super) sent_by_second: Vec<u64>,
    /// Server memory, sampled once a second (with its pid; for soak runs).
    pub(super) rss_by_second: Vec<Option<u64>>,
}

/// The generator's position in the load.
struct Generator<'a> {
    scenario: &'a Scenario,
    target: &'a str,
    state: &'a Shared,
    /// Events go to Kafka when there is a producer, over HTTP otherwise.
    producer: Option<&'a BaseProducer>,
    http: awc::Client,
    run_prefix: String,
    gets_sent: u64,
    user_cursor: usize,
    get_cursor: usize,
    load: Load,
}

/// Runs the load for the scenario's duration and returns what it sent.
pub(super) async fn drive(
    scenario: &Scenario,
    target: &str,
    state: &Shared,
    producer: Option<&BaseProducer>,
    server_pid: Option<u32>,
    progress: Progress,
) -> Load {
    let http = awc::Client::builder()
        .connector(awc::Connector::new().limit(scenario.http_connections))
        .timeout(Duration::from_secs(30))
        .finish();
    let run_prefix = state.borrow().run_prefix.clone();
    let mut generator = Generator {
        scenario,
        target,
        state,
        producer,
        http,
        run_prefix,
        gets_sent: 0,
        user_cursor: 0,
        get_cursor: 0,
        load: Load::default(),
    };
    let load_start = Instant::now();
    {
        let mut s = state.borrow_mut();
        // Times are kept relative to the start of the load; subscriber setup is not in them.
        s.start = load_start;
        s.pushes_by_second.clear();
    }
    let duration = Duration::from_secs_f64(scenario.duration_secs);
    let mut tick = actix_rt::time::interval(Duration::from_millis(1));
    let mut next_progress = 5u64;
    while load_start.elapsed() < duration {
        tick.tick().await;
        let t = load_start.elapsed().as_secs_f64();
        if let Some(pid) = server_pid {
            generator.sample_rss(t, pid);
        }
        generator.send_due_events(t);
        generator.send_due_gets(t);
        if progress.enabled && t as u64 >= next_progress {
            generator.say_progress(t, progress);
            next_progress += 5;
        }
    }
    generator.load.load_secs = load_start.elapsed().as_secs_f64();
    generator.load
}

impl Generator<'_> {
    /// Samples the server's memory once per second of the load.
    fn sample_rss(&mut self, t: f64, pid: u32) {
        let rss_by_second = &mut self.load.rss_by_second;
        let second = t as usize;
        if rss_by_second.len() <= second {
            rss_by_second.resize(second + 1, None);
            rss_by_second[second] = rss_kib(pid);
        }
    }

    /// Sends every event due by `t` seconds into the load.
    fn send_due_events(&mut self, t: f64) {
        let (scenario, state) = (self.scenario, self.state);
        let due = scenario.events_due(t);
        while self.load.events_sent < due {
            // A stride coprime with typical user counts spreads consecutive events over users.
            self.user_cursor = (self.user_cursor + 7919) % scenario.users;
            let user = self.user_cursor;
            let item_n = scenario.item_base + (self.load.events_sent * 31) % scenario.items;
            let item = format!("{}{:0width$}", scenario.item_prefix, item_n, width = scenario.item_pad);
            let (n, at) = {
                let mut s = state.borrow_mut();
                let at = s.micros();
                s.sent[user].push(at);
                ((s.sent[user].len() - 1) as u32, at)
            };
            let id = format!("{}{user}-{n}", self.run_prefix);
            let name = user_name(user);
            let body = json!({ "user_id": name, "item_id": item, "event_type": "view", "event_id": id }).to_string();
            *slot(&mut self.load.sent_by_second, state.borrow().second(at)) += 1;
            self.load.events_sent += 1;
            match self.producer {
                Some(producer) => {
                    let topic = scenario.kafka.as_ref().map_or("liverec.events", |k| k.topic.as_str());
                    if producer.send(BaseRecord::to(topic).key(name.as_str()).payload(&body)).is_err() {
                        let mut s = state.borrow_mut();
                        s.errors.kafka_produce += 1;
                        s.sent[user][n as usize] = FAILED;
                    }
                    producer.poll(Duration::ZERO);
                }
                None => {
                    let request = self
                        .http
                        .post(format!("{}/v1/events", self.target))
                        .insert_header(("content-type", "application/json"));
                    let state = state.clone();
                    state.borrow_mut().outstanding += 1;
                    actix_rt::spawn(async move {
                        let begun = Instant::now();
                        let ok = match request.send_body(body).await {
                            // Read the body so the connection goes back to the pool.
                            Ok(mut r) => r.body().await.is_ok() && r.status().as_u16() == 202,
                            Err(_) => false,
                        };
                        let latency = begun.elapsed().as_micros() as u64;
                        let mut s = state.borrow_mut();
                        s.outstanding -= 1;
                        if ok {
                            s.record_request(at, latency, true);
                        } else {
                            s.errors.post_events += 1;
                            s.sent[user][n as usize] = FAILED;
                        }
                    });
                }
            }
        }
    }

    /// Sends every `GET .../recommendations` due by `t` seconds into the load.
    fn send_due_gets(&mut self, t: f64) {
        let gets_due = (self.scenario.gets_per_s * t) as u64;
        while self.gets_sent < gets_due {
            self.get_cursor = (self.get_cursor + 104_729) % self.scenario.users;
            let url = format!("{}/v1/users/{}/recommendations", self.target, user_name(self.get_cursor));
            let request = self.http.get(url);
            let state = self.state.clone();
            let at = {
                let mut s = state.borrow_mut();
                s.outstanding += 1;
                s.micros()
            };
            self.gets_sent += 1;
            actix_rt::spawn(async move {
                let begun = Instant::now();
                let ok = match request.send().await {
                    Ok(mut r) => r.body().limit(1 << 20).await.is_ok() && r.status().is_success(),
                    Err(_) => false,
                };
                let latency = begun.elapsed().as_micros() as u64;
                let mut s = state.borrow_mut();
                s.outstanding -= 1;
                if ok {
                    s.record_request(at, latency, false);
                } else {
                    s.errors.get_recommendations += 1;
                }
            });
        }
    }

    /// One progress line: what has been sent and received so far.
    fn say_progress(&self, t: f64, progress: Progress) {
        let s = self.state.borrow();
        progress.say(format!(
            "t={:>4} s  events {}  pushes {}  requests {}  errors {}  in flight {}",
            t as u64,
            self.load.events_sent,
            s.pushes.iter().sum::<u64>(),
            s.requests.len(),
            s.errors.total(),
            s.outstanding
        ));
    }
}
