//! Engines registering the model they serve (EngineService.RegisterModel) race each other
//! safely: the comparison with what is registered and the write are one state-machine command,
//! so of many concurrent registrations of two different shapes under one name exactly one
//! shape wins, every registration of the other is refused with FAILED_PRECONDITION, and
//! exactly one call reports `created`.

mod common;

use std::time::Duration;

use proto::engine::engine_service_client::EngineServiceClient;
use proto::engine::RegisterModelRequest;

fn request(experts: u32) -> RegisterModelRequest {
    RegisterModelRequest {
        name: "contested".into(),
        architecture: "mixtral".into(),
        num_layers: 2,
        num_experts: experts,
        top_k: 2,
        weights: "/models/contested".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_registrations_of_two_shapes_leave_exactly_one() {
    let dir = tempfile::tempdir().unwrap();
    let node = common::start_single(common::config(dir.path())).await;
    let url = format!("http://{}", node.raft_addr);
    for round in 0..5 {
        let name_suffix = format!("-{round}");
        let mut tasks = Vec::new();
        for i in 0..16u32 {
            let url = url.clone();
            let suffix = name_suffix.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = EngineServiceClient::connect(url).await.expect("connect");
                let experts = if i % 2 == 0 { 4 } else { 8 };
                let mut r = request(experts);
                r.name.push_str(&suffix);
                (experts, c.register_model(r).await)
            }));
        }
        let mut ok = Vec::new();
        let mut refused = Vec::new();
        for t in tasks {
            let (experts, res) = t.await.unwrap();
            match res {
                Ok(resp) => ok.push((experts, resp.into_inner().created)),
                Err(s) => {
                    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
                    assert!(s.message().contains("another shape"), "{}", s.message());
                    refused.push(experts);
                }
            }
        }
        let winner = ok[0].0;
        assert!(
            ok.iter().all(|(e, _)| *e == winner),
            "round {round}: both shapes accepted: {ok:?}"
        );
        assert!(
            refused.iter().all(|e| *e != winner),
            "round {round}: the winner was refused"
        );
        assert_eq!(
            ok.len(),
            8,
            "round {round}: every registration of the winning shape succeeds"
        );
        assert_eq!(
            ok.iter().filter(|(_, c)| *c).count(),
            1,
            "round {round}: created exactly once"
        );
        let state = node.node.state_machine().state().await;
        let m = &state.models[&format!("contested-{round}")];
        assert_eq!(m.num_experts, winner);
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), node.shutdown()).await;
}
