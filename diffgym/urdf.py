"""URDF kinematic chains evaluated in Warp, and their validation against PyBullet.

``load_urdf(path, tip_link=...)`` parses a URDF (standard-library XML; kinematics only: joints, origins,
axes and limits) into a :class:`KinematicChain` from the root link to ``tip_link``. The chain's numbers
are baked into Warp code as compile-time constants (one specialised, fully unrolled function per chain),
so its forward kinematics runs in one thread per configuration and its adjoint replays every joint.

``validate_urdf(path)`` checks that chain against PyBullet (the reference URDF importer) at random
configurations within the joint limits; ``diffgym validate-urdf PATH [--tcp-link LINK]`` runs it
from the shell. PyBullet is imported only there.
"""

# No ``from __future__ import annotations``: Warp reads the generated functions' annotations at run time.
import dataclasses
import hashlib
import math
import os
import sys
import xml.etree.ElementTree as ET
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import warp as wp

from diffgym.core.bridge import Out, warp_call
from diffgym.core.tensor_checks import check_float32
from diffgym.core.native import native_output_silenced

FIXED, REVOLUTE, PRISMATIC = 0, 1, 2
_KINDS = {"fixed": FIXED, "revolute": REVOLUTE, "continuous": REVOLUTE, "prismatic": PRISMATIC}
_UNSUPPORTED = ("floating", "planar")


# --------------------------------------------------------------------------------------------- parsing
@dataclasses.dataclass(frozen=True)
class UrdfJoint:
    """One URDF ``<joint>``: the child link's pose in the parent's frame is ``origin * motion(q)``."""

    name: str
    type: str
    """``revolute``, ``continuous``, ``prismatic`` or ``fixed``."""
    parent: str
    child: str
    xyz: tuple[float, float, float]
    """Origin translation in the parent link frame [m]."""
    rpy: tuple[float, float, float]
    """Origin rotation in the parent link frame [rad], fixed-axis roll, pitch, yaw (``Rz(y) Ry(p) Rx(r)``)."""
    axis: tuple[float, float, float]
    """Unit joint axis in the joint frame."""
    lower: float = -math.inf
    """Position limits [rad or m]; infinite for continuous and fixed joints."""
    upper: float = math.inf
    velocity: float = math.inf
    """Velocity limit [rad/s or m/s]; infinite when the URDF gives none."""

    @property
    def kind(self) -> int:
        return _KINDS[self.type]

    @property
    def movable(self) -> bool:
        return self.kind != FIXED


def rpy_to_quat(rpy: Sequence[float]) -> np.ndarray:
    """URDF roll-pitch-yaw (fixed axes x, y, z: ``R = Rz(yaw) Ry(pitch) Rx(roll)``) to a unit quaternion
    ``(x, y, z, w)`` in float64."""
    roll, pitch, yaw = (0.5 * float(a) for a in rpy)
    cr, sr, cp, sp, cy, sy = (math.cos(roll), math.sin(roll), math.cos(pitch), math.sin(pitch),
                              math.cos(yaw), math.sin(yaw))
    return np.array([sr * cp * cy - cr * sp * sy,
                     cr * sp * cy + sr * cp * sy,
                     cr * cp * sy - sr * sp * cy,
                     cr * cp * cy + sr * sp * sy])


def _floats(text: str | None, default: tuple[float, ...], what: str) -> tuple[float, ...]:
    if text is None:
        return default
    try:
        values = tuple(float(v) for v in text.split())
    except ValueError:
        raise ValueError(f"{what}: expected {len(default)} numbers, got {text!r}") from None
    if len(values) != len(default) or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what}: expected {len(default)} finite numbers, got {text!r}")
    return values


def _limit(element: ET.Element | None, name: str, default: float, what: str) -> float:
    if element is None or element.get(name) is None:
        return default
    return _floats(element.get(name), (0.0,), f"{what} limit {name}")[0]


def _parse_joint(element: ET.Element, source: str) -> UrdfJoint:
    name = element.get("name") or "?"
    what = f"{source}: joint {name!r}"
    joint_type = element.get("type")
    if joint_type in _UNSUPPORTED or element.find("mimic") is not None:
        kind = "mimic" if element.find("mimic") is not None else joint_type
        raise ValueError(f"{what}: {kind} joints are not supported (only revolute, continuous, prismatic, fixed)")
    if joint_type not in _KINDS:
        raise ValueError(f"{what}: unknown joint type {joint_type!r}")
    parent, child = element.find("parent"), element.find("child")
    if parent is None or child is None or not parent.get("link") or not child.get("link"):
        raise ValueError(f"{what}: needs <parent link=...> and <child link=...>")
    origin = element.find("origin")
    xyz = _floats(None if origin is None else origin.get("xyz"), (0.0, 0.0, 0.0), f"{what} origin xyz")
    rpy = _floats(None if origin is None else origin.get("rpy"), (0.0, 0.0, 0.0), f"{what} origin rpy")
    axis_element = element.find("axis")
    axis = np.array(_floats(None if axis_element is None else axis_element.get("xyz"), (1.0, 0.0, 0.0),
                            f"{what} axis"))  # the URDF default axis is x
    norm = float(np.linalg.norm(axis))
    if joint_type != "fixed" and abs(norm - 1.0) > 1e-6:
        # The spec asks for a unit axis; importers disagree on other lengths (PyBullet scales prismatic
        # motion by it, KDL normalises), so refuse rather than guess.
        raise ValueError(f"{what}: the joint axis must be a unit vector (URDF spec), got {axis.tolist()} "
                         f"of length {norm:.6g}")
    axis = axis / norm if norm > 0 else axis
    limit = element.find("limit")
    if joint_type in ("revolute", "prismatic") and limit is None:
        raise ValueError(f"{what}: {joint_type} joints need a <limit> element (URDF spec)")
    bounded = joint_type in ("revolute", "prismatic")
    lower = _limit(limit, "lower", 0.0, what) if bounded else -math.inf
    upper = _limit(limit, "upper", 0.0, what) if bounded else math.inf
    if lower > upper:
        raise ValueError(f"{what}: lower limit {lower} exceeds upper limit {upper}")
    velocity = _limit(limit, "velocity", math.inf, what) if joint_type != "fixed" else math.inf
    return UrdfJoint(name, joint_type, parent.get("link"), child.get("link"), xyz, rpy,
                     tuple(float(a) for a in axis), lower, upper, velocity)


# --------------------------------------------------------------------------------------------- chain
def _joint_function(kind: int, index: int, origin: wp.transform, axis: wp.vec3, vec: type, name: str) -> Any:
    """One joint's pose function; a factory so each closure captures its own constants."""
    if kind == REVOLUTE:
        def joint_pose(q: vec) -> wp.transform:
            rotation = wp.quat_from_axis_angle(wp.static(axis), q[wp.static(index)])
            return wp.static(origin) * wp.transform(wp.vec3(0.0), rotation)
    elif kind == PRISMATIC:
        def joint_pose(q: vec) -> wp.transform:
            return wp.static(origin) * wp.transform(wp.static(axis) * q[wp.static(index)], wp.quat_identity())
    else:
        def joint_pose(q: vec) -> wp.transform:
            return wp.static(origin)
    return wp.func(joint_pose, name=name, module="unique")


class KinematicChain:
    """The serial chain of a URDF from its root link to ``tip_link``, with Warp forward kinematics.

    ``joints`` lists every joint on the path (fixed ones included) in order; ``links`` their child links,
    so ``link_frames(q)[:, k]`` is the pose of ``links[k]`` and the last one is the tip. ``q`` holds one
    value per movable joint (``dof``), in path order, in rad (revolute) or m (prismatic).
    """

    def __init__(self, robot: str, root: str, joints: Sequence[UrdfJoint], source: str = "<urdf>"):
        self.robot, self.root, self.source = robot, root, source
        self.joints = tuple(joints)
        self.links = tuple(j.child for j in self.joints)
        self.tip = self.links[-1] if self.joints else root
        self.movable_joints = tuple(j for j in self.joints if j.movable)
        self.dof = len(self.movable_joints)
        if self.dof == 0:
            raise ValueError(f"{source}: no movable joint between {root!r} and {self.tip!r}")
        self.joint_names = tuple(j.name for j in self.movable_joints)
        self.lower = np.array([j.lower for j in self.movable_joints])
        self.upper = np.array([j.upper for j in self.movable_joints])
        self.velocity_limits = np.array([j.velocity for j in self.movable_joints])
        self.vector_type = wp.types.vector(length=self.dof, dtype=wp.float32)
        """The Warp type of one configuration (``wp.array(dtype=chain.vector_type)`` takes a (B, dof) tensor)."""

    def __repr__(self) -> str:
        return (f"KinematicChain({self.robot!r}: {self.root} -> {self.tip}, {self.dof} DOF, "
                f"{len(self.joints)} joints)")

    # ------------------------------------------------------------------------- compile-time constants
    @cached_property
    def _constants(self) -> tuple[tuple, ...]:
        """Per joint on the path: (kind, q index, origin transform, axis), as float32 Warp values."""
        out, index = [], 0
        for joint in self.joints:
            quat = rpy_to_quat(joint.rpy)
            origin = wp.transform(wp.vec3(*joint.xyz), wp.quat(*quat))
            out.append((joint.kind, index if joint.movable else -1, origin, wp.vec3(*joint.axis)))
            index += joint.movable
        return tuple(out)

    @cached_property
    def digest(self) -> str:
        """A short hash of the chain's numbers: names the generated Warp code (no clashes between chains)."""
        text = repr([(k, i, [float(v) for v in o], [float(v) for v in a]) for k, i, o, a in self._constants])
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    # ------------------------------------------------------------------------- Warp code
    @cached_property
    def joint_functions(self) -> tuple[Any, ...]:
        """Per joint on the path, a Warp function ``(q: vector_type) -> wp.transform``: the child link's
        pose in the parent link's frame, ``origin * motion(q[index])`` with the numbers baked in."""
        return tuple(_joint_function(kind, index, origin, axis, self.vector_type, f"joint_pose_{self.digest}_{k}")
                     for k, (kind, index, origin, axis) in enumerate(self._constants))

    @cached_property
    def tip_function(self) -> Any:
        """A Warp function ``(q: vector_type) -> wp.vec3``: the tip position in the root frame [m].

        The joints are unrolled at code generation (``wp.static``), so the adjoint replays the whole chain.
        """
        joints, vec = self.joint_functions, self.vector_type

        def fk_tip(q: vec) -> wp.vec3:
            x = wp.transform_identity()
            for k in range(wp.static(len(joints))):
                x = x * wp.static(joints[k])(q)
            return wp.transform_get_translation(x)

        return wp.func(fk_tip, name=f"fk_tip_{self.digest}", module="unique")

    @cached_property
    def _tip_kernel(self) -> Any:
        fk_tip, vec = self.tip_function, self.vector_type

        def fk_tip_kernel(q: wp.array(dtype=vec), tip: wp.array(dtype=wp.vec3)):
            i = wp.tid()
            tip[i] = fk_tip(q[i])

        return wp.kernel(fk_tip_kernel, name=f"fk_tip_kernel_{self.digest}", module="unique")

    @cached_property
    def _frames_kernel(self) -> Any:
        joints, vec = self.joint_functions, self.vector_type

        def fk_frames_kernel(q: wp.array(dtype=vec), frames: wp.array2d(dtype=wp.transform)):
            i = wp.tid()
            qi = q[i]
            x = wp.transform_identity()
            for k in range(wp.static(len(joints))):
                x = x * wp.static(joints[k])(qi)
                frames[i, k] = x

        return wp.kernel(fk_frames_kernel, name=f"fk_frames_kernel_{self.digest}", module="unique")

    # ------------------------------------------------------------------------- torch API
    def check_configuration(self, q: Any, device: torch.device | str | None = None) -> torch.Tensor:
        """Validate a configuration batch: a finite float32 tensor ``(B, dof)``; raise naming what was expected."""
        return check_float32(q, "q", ("B", self.dof), "(row, joint)",
                             None if device is None else torch.device(device), unit=" in rad")

    def forward_kinematics(self, q: torch.Tensor) -> torch.Tensor:
        """Tip position ``(B, 3)`` [m] in the root frame for configurations ``q`` ``(B, dof)``; differentiable."""
        q = self.check_configuration(q)
        (tip,) = warp_call(self._tip_kernel, q.shape[0], [q], [], [Out((q.shape[0], 3))])
        return tip

    def link_frames(self, q: torch.Tensor) -> torch.Tensor:
        """Pose of every link on the chain, ``(B, len(links), 7)`` as ``[x, y, z, qx, qy, qz, qw]`` in the
        root frame; differentiable."""
        q = self.check_configuration(q)
        (frames,) = warp_call(self._frames_kernel, q.shape[0], [q], [], [Out((q.shape[0], len(self.links), 7))])
        return frames

    def sample_configurations(self, count: int, seed: int = 0) -> np.ndarray:
        """``count`` configurations uniform within the limits (``[-pi, pi]`` for unbounded joints), float64."""
        rng = np.random.default_rng(seed)
        lower = np.where(np.isfinite(self.lower), self.lower, -math.pi)
        upper = np.where(np.isfinite(self.upper), self.upper, math.pi)
        return rng.uniform(lower, upper, size=(count, self.dof))


def load_urdf(path: str | os.PathLike, tip_link: str | None = None) -> KinematicChain:
    """Parse the URDF at ``path`` into the chain from its root link to ``tip_link``.

    ``tip_link`` defaults to the only leaf link when the tree is a single chain; a branched tree (e.g. a
    hand with two fingers) needs it named.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"URDF not found: {path}")
    try:
        robot = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise ValueError(f"{path}: not valid XML ({error})") from None
    if robot.tag != "robot":
        raise ValueError(f"{path}: the root element must be <robot>, got <{robot.tag}>")
    links = [link.get("name") for link in robot.findall("link")]
    joints = [_parse_joint(j, str(path)) for j in robot.findall("joint")]
    by_child: dict[str, UrdfJoint] = {}
    for joint in joints:
        for link in (joint.parent, joint.child):
            if link not in links:
                raise ValueError(f"{path}: joint {joint.name!r} refers to an undeclared link {link!r}")
        if joint.child in by_child:
            raise ValueError(f"{path}: link {joint.child!r} has two parent joints")
        by_child[joint.child] = joint
    roots = [link for link in links if link not in by_child]
    if len(roots) != 1:
        raise ValueError(f"{path}: expected one root link, found {roots}")
    parents = {j.parent for j in joints}
    leaves = [link for link in links if link not in parents]
    if tip_link is None:
        if len(leaves) != 1:
            raise ValueError(f"{path}: the tree has several leaf links {leaves}; name the tip (tcp) link")
        tip_link = leaves[0]
    if tip_link not in links:
        raise ValueError(f"{path}: no link named {tip_link!r} (links: {links})")
    path_joints: list[UrdfJoint] = []
    link = tip_link
    while link in by_child:
        path_joints.append(by_child[link])
        link = by_child[link].parent
        if len(path_joints) > len(joints):
            raise ValueError(f"{path}: the joints form a cycle")
    return KinematicChain(robot.get("name") or path.stem, roots[0], path_joints[::-1], source=str(path))


# --------------------------------------------------------------------------------------------- validation
@dataclasses.dataclass
class LinkError:
    link: str
    max_position_error: float
    """Largest distance between the Warp and PyBullet link origins [m]."""
    max_rotation_error: float
    """Largest angle of the rotation between the Warp and PyBullet link frames [rad]."""


@dataclasses.dataclass
class UrdfValidationReport:
    """What :func:`validate_urdf` found; ``passed`` when every error is within tolerance."""

    path: str
    chain: str
    samples: int
    links: list[LinkError]
    """Every link on the chain, the tip last."""
    tcp_position_error: float
    """Largest error of :meth:`KinematicChain.forward_kinematics` (the tip-only kernel) [m]."""
    limit_mismatches: list[str]
    """Joints whose position or velocity limits PyBullet reads differently."""
    position_tolerance: float
    rotation_tolerance: float

    @property
    def max_position_error(self) -> float:
        return max([self.tcp_position_error] + [e.max_position_error for e in self.links])

    @property
    def max_rotation_error(self) -> float:
        return max(e.max_rotation_error for e in self.links)

    @property
    def passed(self) -> bool:
        return (self.max_position_error < self.position_tolerance
                and self.max_rotation_error < self.rotation_tolerance and not self.limit_mismatches)

    def __str__(self) -> str:
        tcp_row = "tcp (forward_kinematics)"
        width = max([len(tcp_row)] + [len(e.link) for e in self.links])
        lines = [f"{self.path}: {self.chain}, Warp float32 forward kinematics vs PyBullet at {self.samples} "
                 f"random configurations within the joint limits",
                 f"  {'link'.ljust(width)}  max position error [m]  max rotation error [rad]"]
        lines += [f"  {e.link.ljust(width)}  {e.max_position_error:22.3e}  {e.max_rotation_error:24.3e}"
                  for e in self.links]
        lines.append(f"  {tcp_row.ljust(width)}  {self.tcp_position_error:22.3e}")
        lines += [f"  limit mismatch: {m}" for m in self.limit_mismatches]
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"{verdict}: max position error {self.max_position_error:.3e} m "
                     f"(tolerance {self.position_tolerance:g}), max rotation error "
                     f"{self.max_rotation_error:.3e} rad (tolerance {self.rotation_tolerance:g}), "
                     f"{len(self.limit_mismatches)} limit mismatches")
        return "\n".join(lines)


def _quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of quaternions ``(..., 4)`` stored (x, y, z, w)."""
    av, aw, bv, bw = a[..., :3], a[..., 3:], b[..., :3], b[..., 3:]
    return np.concatenate([aw * bv + bw * av + np.cross(av, bv), aw * bw - np.sum(av * bv, -1, keepdims=True)], -1)


def _quat_angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle [rad] of the rotation between unit quaternions ``(..., 4)`` (x, y, z, w), in float64."""
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    # conj(a) * b: its vector part's norm and scalar part give the angle stably (atan2, not acos)
    relative = _quat_multiply(a * np.array([-1.0, -1.0, -1.0, 1.0]), b)
    return 2.0 * np.arctan2(np.linalg.norm(relative[..., :3], axis=-1), np.abs(relative[..., 3]))


def pybullet_link_frames(chain: KinematicChain, path: str | os.PathLike, q: np.ndarray) -> tuple[np.ndarray, dict]:
    """PyBullet's pose of every link of ``chain`` (root frame, ``(S, len(links), 7)``) at configurations
    ``q`` ``(S, dof)``, and the limits PyBullet read per movable joint (``{name: (lower, upper, velocity)}``)."""
    try:
        with native_output_silenced():  # its import prints a build banner
            import pybullet
    except ImportError:  # pragma: no cover - pybullet is a test extra
        raise ImportError("URDF validation needs PyBullet: pip install pybullet") from None
    client = pybullet.connect(pybullet.DIRECT)
    try:
        with native_output_silenced():
            body = pybullet.loadURDF(str(Path(path).resolve()), useFixedBase=True, physicsClientId=client)
        index, limits = {}, {}
        for i in range(pybullet.getNumJoints(body, physicsClientId=client)):
            info = pybullet.getJointInfo(body, i, physicsClientId=client)
            joint_name, link_name = info[1].decode(), info[12].decode()
            index[link_name] = i
            limits[joint_name] = (info[8], info[9], info[11])
        missing = [link for link in chain.links if link not in index]
        if missing:
            raise ValueError(f"PyBullet did not load links {missing} of {path}")
        # The base's reported pose is its centre of mass; the root link frame is that times inv(inertial).
        com_pos, com_orn = pybullet.getBasePositionAndOrientation(body, physicsClientId=client)
        inertial_pos, inertial_orn = pybullet.getDynamicsInfo(body, -1, physicsClientId=client)[3:5]
        root_pos, root_orn = pybullet.multiplyTransforms(com_pos, com_orn,
                                                         *pybullet.invertTransform(inertial_pos, inertial_orn))
        world_to_root = pybullet.invertTransform(root_pos, root_orn)
        movable = [index[j.child] for j in chain.movable_joints]
        link_indices = [index[link] for link in chain.links]
        frames = np.empty((len(q), len(chain.links), 7))
        for s, config in enumerate(q):
            for joint_index, value in zip(movable, config):
                pybullet.resetJointState(body, joint_index, float(value), physicsClientId=client)
            states = pybullet.getLinkStates(body, link_indices, computeForwardKinematics=True,
                                            physicsClientId=client)
            for k, state in enumerate(states):
                pos, orn = pybullet.multiplyTransforms(*world_to_root, state[4], state[5])
                frames[s, k, :3], frames[s, k, 3:] = pos, orn
        return frames, limits
    finally:
        pybullet.disconnect(physicsClientId=client)


def validate_urdf(path: str | os.PathLike, samples: int = 1000, seed: int = 0, tip_link: str | None = None,
                  position_tolerance: float = 1e-5, rotation_tolerance: float = 1e-5) -> UrdfValidationReport:
    """Compare DiffGym's Warp forward kinematics of the URDF at ``path`` with PyBullet's.

    At ``samples`` random configurations within the joint limits, every link frame on the chain from the
    root to ``tip_link`` (pose relative to the root link) and the tip position of ``forward_kinematics``
    are compared; so are the joint limits PyBullet reads. Both sides get the same float32-rounded ``q``.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    chain = load_urdf(path, tip_link)
    q = chain.sample_configurations(samples, seed).astype(np.float32)
    q_torch = torch.from_numpy(q)
    with torch.no_grad():
        warp_frames = chain.link_frames(q_torch).double().numpy()
        warp_tip = chain.forward_kinematics(q_torch).double().numpy()
    reference, limits = pybullet_link_frames(chain, path, q.astype(np.float64))
    position_error = np.linalg.norm(warp_frames[..., :3] - reference[..., :3], axis=-1).max(axis=0)
    rotation_error = _quat_angle(warp_frames[..., 3:], reference[..., 3:]).max(axis=0)
    tcp_error = float(np.linalg.norm(warp_tip - reference[:, -1, :3], axis=-1).max())
    mismatches = []
    for joint in chain.movable_joints:
        lower, upper, velocity = limits[joint.name]
        if joint.type in ("revolute", "prismatic") and (lower != joint.lower or upper != joint.upper):
            mismatches.append(f"{joint.name}: position limits [{joint.lower}, {joint.upper}] parsed, "
                              f"[{lower}, {upper}] in PyBullet")
        if math.isfinite(joint.velocity) and velocity != joint.velocity:
            mismatches.append(f"{joint.name}: velocity limit {joint.velocity} parsed, {velocity} in PyBullet")
    links = [LinkError(link, float(p), float(r)) for link, p, r in zip(chain.links, position_error, rotation_error)]
    return UrdfValidationReport(str(path), repr(chain), samples, links, tcp_error, mismatches,
                                position_tolerance, rotation_tolerance)


# --------------------------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m diffgym.urdf validate PATH [...]``: the same as ``diffgym validate-urdf PATH [...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "validate":
        print("usage: python -m diffgym.urdf validate PATH [--tcp-link LINK] [--samples N] [--seed S]",
              file=sys.stderr)
        return 2
    from diffgym.cli import main as diffgym_main

    return diffgym_main(["validate-urdf", *argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
