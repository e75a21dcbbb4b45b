"""The URDF loader and Warp forward kinematics against PyBullet (the only place PyBullet is used)."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import diffgym.urdf as urdf
from diffgym.envs.franka_reach import FR3, FR3_TCP_LINK, FrankaReach, fr3_urdf_path
from diffgym.urdf import load_urdf, main, validate_urdf

pybullet = pytest.importorskip("pybullet")

# The FR3 facts of franka_description (robots/fr3), as issue 3 states them.
FR3_ORIGINS = [((0, 0, 0.333), (0, 0, 0)), ((0, 0, 0), (-math.pi / 2, 0, 0)), ((0, -0.316, 0), (math.pi / 2, 0, 0)),
               ((0.0825, 0, 0), (math.pi / 2, 0, 0)), ((-0.0825, 0.384, 0), (-math.pi / 2, 0, 0)),
               ((0, 0, 0), (math.pi / 2, 0, 0)), ((0.088, 0, 0), (math.pi / 2, 0, 0)),
               ((0, 0, 0.107), (0, 0, 0)), ((0, 0, 0), (0, 0, -math.pi / 4)), ((0, 0, 0.1034), (0, 0, 0))]
FR3_LOWER = [-2.7437, -1.7837, -2.9007, -3.0421, -2.8065, 0.5445, -3.0159]
FR3_UPPER = [2.7437, 1.7837, 2.9007, -0.1518, 2.8065, 4.5169, 3.0159]
FR3_VELOCITY = [2.62, 2.62, 2.62, 2.62, 5.26, 4.18, 5.26]

# A small arm exercising what the FR3 does not: all three rpy angles, tilted axes, the default x axis,
# prismatic and continuous joints, a joint at a link's far end and a branch (two fingertips).
TOY_URDF = """<?xml version="1.0"?>
<robot name="toy">
  <link name="base"><inertial><origin xyz="0.1 -0.2 0.05" rpy="0.3 0.1 -0.2"/><mass value="1.5"/>
    <inertia ixx="0.01" ixy="0" ixz="0" iyy="0.02" iyz="0" izz="0.03"/></inertial></link>
  <link name="a"/><link name="b"/><link name="c"/><link name="d"/><link name="tip_left"/><link name="tip_right"/>
  <joint name="j1" type="continuous"><parent link="base"/><child link="a"/>
    <origin xyz="0.1 0.2 0.3" rpy="0.3 -0.4 0.5"/><axis xyz="0 0.6 0.8"/></joint>
  <joint name="j2" type="prismatic"><parent link="a"/><child link="b"/>
    <origin xyz="0 0 0.25" rpy="1.2 0.7 -2.1"/><axis xyz="0.6 0 -0.8"/>
    <limit lower="-0.2" upper="0.3" velocity="0.5" effort="10"/></joint>
  <joint name="j3" type="revolute"><parent link="b"/><child link="c"/>
    <origin xyz="0.3 -0.1 0.05" rpy="-0.2 1.1 0.4"/>
    <limit lower="-1.5" upper="2.0" velocity="1.5" effort="10"/></joint>
  <joint name="fixed" type="fixed"><parent link="c"/><child link="d"/>
    <origin xyz="0.05 0.02 -0.1" rpy="0.5 0.5 0.5"/></joint>
  <joint name="left" type="fixed"><parent link="d"/><child link="tip_left"/><origin xyz="0 0.03 0.1"/></joint>
  <joint name="right" type="fixed"><parent link="d"/><child link="tip_right"/><origin xyz="0 -0.03 0.1"/></joint>
</robot>
"""


@pytest.fixture(scope="module")
def fr3_report():
    # the hand branches into the TCP and the two fingers: the task chain ends at the TCP
    return validate_urdf(fr3_urdf_path(), samples=1000, seed=0, tip_link=FR3_TCP_LINK)


def test_fr3_urdf_encodes_franka_kinematics_and_limits():
    assert FR3.root == "fr3_link0" and FR3.tip == "fr3_hand_tcp" and FR3.dof == 7
    assert [j.type for j in FR3.joints] == ["revolute"] * 7 + ["fixed"] * 3
    for joint, (xyz, rpy) in zip(FR3.joints, FR3_ORIGINS):
        np.testing.assert_allclose(joint.xyz, xyz, atol=1e-12, err_msg=joint.name)
        np.testing.assert_allclose(joint.rpy, rpy, atol=1e-12, err_msg=joint.name)
    assert all(j.axis == (0.0, 0.0, 1.0) for j in FR3.movable_joints)
    np.testing.assert_array_equal(FR3.lower, FR3_LOWER)
    np.testing.assert_array_equal(FR3.upper, FR3_UPPER)
    np.testing.assert_array_equal(FR3.velocity_limits, FR3_VELOCITY)


def test_fr3_every_link_frame_and_tcp_match_pybullet(fr3_report):
    assert [e.link for e in fr3_report.links] == ["fr3_link1", "fr3_link2", "fr3_link3", "fr3_link4", "fr3_link5",
                                                  "fr3_link6", "fr3_link7", "fr3_link8", "fr3_hand", "fr3_hand_tcp"]
    assert fr3_report.samples == 1000
    assert fr3_report.max_position_error < 1e-5, str(fr3_report)
    assert fr3_report.tcp_position_error < 1e-5, str(fr3_report)
    assert fr3_report.max_rotation_error < 1e-5, str(fr3_report)
    assert fr3_report.passed and "PASS" in str(fr3_report)


def test_pybullet_reads_the_task_joint_limits(fr3_report):
    assert fr3_report.limit_mismatches == []
    client = pybullet.connect(pybullet.DIRECT)
    try:
        body = pybullet.loadURDF(str(fr3_urdf_path()), useFixedBase=True, physicsClientId=client)
        infos = [pybullet.getJointInfo(body, i, physicsClientId=client) for i in range(7)]
    finally:
        pybullet.disconnect(client)
    assert [info[1].decode() for info in infos] == [f"fr3_joint{k}" for k in range(1, 8)]
    np.testing.assert_array_equal([info[8] for info in infos], FR3_LOWER)
    np.testing.assert_array_equal([info[9] for info in infos], FR3_UPPER)
    np.testing.assert_array_equal([info[11] for info in infos], FR3_VELOCITY)
    # the task clips to the same limits (as float32) and scales actions by the same velocities
    np.testing.assert_array_equal(FrankaReach.joint_lower, np.float32(FR3_LOWER))
    np.testing.assert_array_equal(FrankaReach.joint_upper, np.float32(FR3_UPPER))
    np.testing.assert_array_equal(FrankaReach.velocity_limits, np.float32(FR3_VELOCITY))


@pytest.mark.parametrize("finger", ["fr3_leftfinger", "fr3_rightfinger"])
def test_fr3_finger_frames_match_pybullet(finger: str):
    report = validate_urdf(fr3_urdf_path(), samples=200, seed=2, tip_link=finger)
    assert report.links[-1].link == finger and report.passed, str(report)


@pytest.mark.parametrize("tip", ["tip_left", "tip_right"])
def test_general_urdf_matches_pybullet(tmp_path: Path, tip: str):
    path = tmp_path / "toy.urdf"
    path.write_text(TOY_URDF)
    report = validate_urdf(path, samples=300, seed=1, tip_link=tip)
    assert [e.link for e in report.links] == ["a", "b", "c", "d", tip]
    assert report.passed, str(report)


def test_validation_catches_a_wrong_convention(tmp_path: Path, monkeypatch):
    # Swapping URDF's fixed-axis rpy for the moving-axis order must be detected (the check can fail).
    path = tmp_path / "toy.urdf"
    path.write_text(TOY_URDF)
    right = urdf.rpy_to_quat

    def moving_axes(rpy):
        q = right((rpy[0], 0, 0)), right((0, rpy[1], 0)), right((0, 0, rpy[2]))
        return urdf._quat_multiply(urdf._quat_multiply(q[0], q[1]), q[2])

    monkeypatch.setattr(urdf, "rpy_to_quat", moving_axes)
    report = validate_urdf(path, samples=50, tip_link="tip_left")
    assert not report.passed and report.max_position_error > 1e-3 and "FAIL" in str(report)


def test_limit_mismatch_is_reported(tmp_path: Path, monkeypatch):
    path = tmp_path / "toy.urdf"
    path.write_text(TOY_URDF)
    chain = load_urdf(path, "tip_left")
    wrong = dataclasses.replace(chain.joints[2], upper=1.9)  # PyBullet will read 2.0
    monkeypatch.setattr(urdf, "load_urdf", lambda *_: urdf.KinematicChain(
        chain.robot, chain.root, [*chain.joints[:2], wrong, *chain.joints[3:]], chain.source))
    report = validate_urdf(path, samples=10)
    assert not report.passed and len(report.limit_mismatches) == 1 and "j3" in report.limit_mismatches[0]


def test_loader_errors_are_clear(tmp_path: Path):
    path = tmp_path / "toy.urdf"
    path.write_text(TOY_URDF)
    with pytest.raises(ValueError, match=r"several leaf links \['tip_left', 'tip_right'\]"):
        load_urdf(path)
    with pytest.raises(ValueError, match="no link named 'hand'"):
        load_urdf(path, "hand")
    with pytest.raises(FileNotFoundError, match="URDF not found"):
        load_urdf(tmp_path / "missing.urdf")
    floating = TOY_URDF.replace('type="continuous"', 'type="floating"')
    (tmp_path / "floating.urdf").write_text(floating)
    with pytest.raises(ValueError, match="joint 'j1': floating joints are not supported"):
        load_urdf(tmp_path / "floating.urdf", "tip_left")
    scaled_axis = TOY_URDF.replace('<axis xyz="0.6 0 -0.8"/>', '<axis xyz="1 1 0"/>')
    (tmp_path / "scaled_axis.urdf").write_text(scaled_axis)
    with pytest.raises(ValueError, match="joint 'j2': the joint axis must be a unit vector"):
        load_urdf(tmp_path / "scaled_axis.urdf", "tip_left")
    no_limit = TOY_URDF.replace('<limit lower="-1.5" upper="2.0" velocity="1.5" effort="10"/>', "")
    (tmp_path / "no_limit.urdf").write_text(no_limit)
    with pytest.raises(ValueError, match="joint 'j3': revolute joints need a <limit>"):
        load_urdf(tmp_path / "no_limit.urdf", "tip_left")


def test_command_line(tmp_path: Path, capsys):
    path = tmp_path / "toy.urdf"
    path.write_text(TOY_URDF)
    assert main(["validate", str(path), "--tcp-link", "tip_right", "--samples", "20"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "tip_right" in out and "20 random configurations" in out
    assert main(["validate", str(path)]) == 2  # branched: the tip must be named
    assert "name the tip" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "missing.urdf")]) == 2
    assert main([]) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fr3_forward_kinematics_on_cuda_matches_cpu():
    q = torch.from_numpy(FR3.sample_configurations(256, seed=3).astype(np.float32))
    cpu = FR3.link_frames(q)
    gpu = FR3.link_frames(q.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, atol=2e-6, rtol=0)
    torch.testing.assert_close(FR3.forward_kinematics(q.cuda()).cpu(), cpu[:, -1, :3], atol=2e-6, rtol=0)
