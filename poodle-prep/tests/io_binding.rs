//! The I/O binding path (inputs written into the session's input memory and bound once per
//! batch, output bound to host memory) gives the same flows as plain `Session::run`, on CPU,
//! for the shipped models, on real frames; and a second batch sees its own inputs, not the
//! ones bound before.

use poodle_common::flowmath::Map;
use poodle_prep::decode::decode_image;
use poodle_prep::flowmodel::{Device, FlowModel};

mod common;

const SIZES: [(usize, usize); 2] = [(128, 224), (136, 240)];

/// RubberWhale and KITTI frames at (h, w): two different pairs for one batch.
fn frames(dir: &std::path::Path, (h, w): (usize, usize)) -> Vec<(Map, Map)> {
    let load = |name: &str| {
        let f = decode_image(&dir.join(name), h, w).unwrap();
        Map::from_hwc_u8(f.height, f.width, &f.rgb)
    };
    vec![
        (load("rubberwhale1.png"), load("rubberwhale2.png")),
        (load("KITTI_frame1.png"), load("KITTI_frame2.png")),
    ]
}

fn run(model: &mut FlowModel, imgs: &[(Map, Map)]) -> Vec<Map> {
    let pairs: Vec<(&Map, &Map)> = imgs.iter().map(|(a, b)| (a, b)).collect();
    model.flow(&pairs).unwrap()
}

fn max_diff(a: &[Map], b: &[Map]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.data.iter().zip(&y.data).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn bound_and_plain_runs_give_the_same_flows() {
    let Some(dir) = common::shared_data("flow", "KITTI_frame1.png") else {
        return;
    };
    let lib = common::ort_lib();
    for card in ["models/raft_small_random.json", "models/tvl1_flow.json"] {
        let card = common::repo().join(card);
        let mut model = FlowModel::load(&card, Device::Cpu, &lib, 2).unwrap();
        let imgs: Vec<Vec<(Map, Map)>> = SIZES.iter().map(|&s| frames(&dir, s)).collect();
        let plain: Vec<Vec<Map>> = imgs.iter().map(|i| run(&mut model, i)).collect();
        // One binding through every size: a change of batch shape rebinds.
        model.set_io_binding(true).unwrap();
        assert!(model.io_binding());
        for (k, size) in SIZES.into_iter().enumerate() {
            let bound = run(&mut model, &imgs[k]);
            assert_eq!(bound.len(), 2);
            assert_eq!((bound[0].h, bound[0].w), size);
            let d = max_diff(&plain[k], &bound);
            assert!(
                d <= 1e-4,
                "{}: bound vs plain differ by {d} px",
                card.display()
            );
            // Same shape, swapped pairs: the rebound inputs are used, not the earlier ones.
            let swapped: Vec<(Map, Map)> = imgs[k].iter().rev().cloned().collect();
            let again = run(&mut model, &swapped);
            let want = [plain[k][1].clone(), plain[k][0].clone()];
            let d = max_diff(&want, &again);
            assert!(
                d <= 1e-4,
                "{}: second bound batch differs by {d}",
                card.display()
            );
            assert!(
                max_diff(&plain[k], &again) > 0.1,
                "the two pairs must differ"
            );
        }
        // A batch of one pair after batches of two.
        let one = run(&mut model, &imgs[0][..1]);
        assert!(max_diff(&plain[0][..1], &one) <= 1e-4);
    }
}
