"""The ``video`` extra installs what recording needs (issue 26 item 10): Gymnasium's ``RecordVideo``
wrapper (moviepy) as well as ``diffgym eval --video`` (imageio). tests/test_makefile.py checks that every
requirement of the extras ``make install`` names is installed in the test venv."""

import configparser
from pathlib import Path

import gymnasium as gym
from gymnasium.wrappers import RecordVideo

import diffgym  # noqa: F401  (registers the tasks)

REPO = Path(__file__).resolve().parents[1]


def test_record_video_writes_an_episode(tmp_path):
    env = RecordVideo(gym.make("DiffGym/PointMass1D-v0", render_mode="rgb_array", max_episode_steps=5), str(tmp_path),
                      disable_logger=True)
    env.reset(seed=0)
    done = False
    while not done:
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        done = terminated or truncated
    env.close()
    (video,) = tmp_path.glob("*.mp4")
    assert video.stat().st_size > 1000


def test_video_extra_names_what_recording_imports():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    names = {line.split(">")[0].split("=")[0].strip() for line in setup["options.extras_require"]["video"].split()}
    assert {"moviepy", "imageio", "imageio-ffmpeg"} <= names
