//! Dataset configs: one small JSON file per dataset in `manifests/` that says where videos are,
//! how pairs are drawn, at which resolution they are stored and with which seed.
//!
//! Unknown keys are an error (a misspelt option must not be silently ignored).

use crate::atomic::read_json;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// Short name, used in store attributes and output paths.
    pub name: String,
    /// Where the videos are and how to find them.
    pub layout: Layout,
    /// How frame pairs are drawn from each video.
    pub sampling: Sampling,
    /// Stored frame size (height, width); frames are resized to it when decoded.
    pub height: usize,
    pub width: usize,
    /// Pairs per Zarr shard (one shard file per array holds this many pairs).
    #[serde(default = "default_pairs_per_shard")]
    pub pairs_per_shard: usize,
    /// Seed of the pair sampling.
    #[serde(default)]
    pub seed: u64,
    /// Default root when the user gives none (relative to the project root).
    #[serde(default)]
    pub default_root: Option<String>,
}

fn default_pairs_per_shard() -> usize {
    64
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Layout {
    /// BDD100K: `videos/{split}/*.mov` under the root.
    Bdd { splits: Vec<String> },
    /// Any folder of videos (searched recursively), by extension.
    Folder { extensions: Vec<String> },
    /// Folders of image sequences; the frame number is the last run of digits in the file name.
    Frames { extensions: Vec<String> },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Sampling {
    /// A pool of P = `pairs_per_video` pairs per video: t uniform over the valid starts,
    /// dt ~ U{dt_min..dt_max} frames (BDD: 15..30). Training draws R pairs from the pool at
    /// every visit of the video (the authors draw fresh pairs online; poodle precomputes
    /// their flow for the pool). Disk grows linearly with P: `poodle-prep discover` prints it.
    PerVideo {
        pairs_per_video: usize,
        dt_min: u64,
        dt_max: u64,
    },
    /// Consecutive clips of `clip_seconds`; `pairs_per_clip` pairs per clip with a gap of
    /// `dt_seconds` (Walking Tours: 10 s clips, 0.5 s gap).
    Clips {
        clip_seconds: f64,
        dt_seconds: f64,
        pairs_per_clip: usize,
    },
    /// Image sequences: every pair of consecutive available frames.
    Consecutive,
}

impl DatasetConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let cfg: DatasetConfig = read_json(path)?;
        cfg.validate().map_err(|msg| Error::Config {
            path: path.to_path_buf(),
            msg,
        })?;
        Ok(cfg)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.height == 0 || self.width == 0 {
            return Err(format!(
                "height and width must be positive, got {}x{}",
                self.height, self.width
            ));
        }
        if self.pairs_per_shard == 0 {
            return Err("pairs_per_shard must be positive".into());
        }
        match (&self.layout, &self.sampling) {
            (Layout::Frames { .. }, Sampling::Consecutive) => {}
            (Layout::Frames { .. }, _) => {
                return Err("layout 'frames' needs sampling 'consecutive'".into())
            }
            (_, Sampling::Consecutive) => {
                return Err("sampling 'consecutive' is only for layout 'frames'".into())
            }
            _ => {}
        }
        match &self.sampling {
            Sampling::PerVideo {
                pairs_per_video,
                dt_min,
                dt_max,
            } => {
                if *pairs_per_video == 0 || *dt_min == 0 || dt_min > dt_max {
                    return Err(format!(
                        "per_video sampling needs pairs_per_video > 0 and 0 < dt_min <= dt_max, got R={pairs_per_video}, dt {dt_min}..{dt_max}"
                    ));
                }
            }
            Sampling::Clips {
                clip_seconds,
                dt_seconds,
                pairs_per_clip,
            } => {
                if *pairs_per_clip == 0 || *dt_seconds <= 0.0 || clip_seconds <= dt_seconds {
                    return Err(format!(
                        "clips sampling needs pairs_per_clip > 0 and 0 < dt_seconds < clip_seconds, got {pairs_per_clip}, {dt_seconds}, {clip_seconds}"
                    ));
                }
            }
            Sampling::Consecutive => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_rejected() {
        let json = r#"{"name":"x","layout":{"kind":"folder","extensions":["mp4"]},
            "sampling":{"kind":"per_video","pairs_per_video":2,"dt_min":15,"dt_max":30},
            "height":360,"width":640,"seeed":1}"#;
        let err = serde_json::from_str::<DatasetConfig>(json).unwrap_err();
        assert!(err.to_string().contains("seeed"), "{err}");
    }

    #[test]
    fn shipped_manifests_parse_and_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "json") {
                let cfg = DatasetConfig::load(&p).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(p.file_stem().unwrap().to_str().unwrap(), cfg.name);
                n += 1;
            }
        }
        assert!(
            n >= 5,
            "expected bdd, wt, folder, frames, sample configs; found {n}"
        );
    }

    #[test]
    fn inverted_dt_range_is_rejected() {
        let cfg = DatasetConfig {
            name: "x".into(),
            layout: Layout::Folder {
                extensions: vec!["mp4".into()],
            },
            sampling: Sampling::PerVideo {
                pairs_per_video: 1,
                dt_min: 30,
                dt_max: 15,
            },
            height: 8,
            width: 8,
            pairs_per_shard: 4,
            seed: 0,
            default_root: None,
        };
        assert!(cfg.validate().unwrap_err().contains("dt 30..15"));
    }
}
