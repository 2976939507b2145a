"""MuJoCo offscreen rendering of scene specs: RGB images and per-object segmentation labels.

One MjModel is compiled once with a table, a floor, two directional lights, one camera and a fixed number
of object *slots* (a geom with its own material each). A scene is shown by editing that model in place
(geom type/size/pos/quat/rgba/group, material color/specular, camera and light pose) and calling
`mj_kinematics`; nothing is recompiled per scene. Object `id` k of a spec always occupies slot k, so a
segmentation label is the object id. Unused slots are moved to geom group 3, which the renderer does not
draw (so they neither appear, cast shadows nor show up in the segmentation).

Process rules (measured with Mesa llvmpipe through EGL on a 2-core machine):
  * MUJOCO_GL=egl must be set before mujoco is imported (done below with setdefault).
  * Create one SceneRenderer per process, inside that process; never fork after creating one (EGL hangs).
  * llvmpipe (Mesa's CPU GL) spreads each frame over all cores. When running one worker per core, set
    LP_NUM_THREADS=1 in each worker's environment before the renderer is created: processes then scale
    instead of fighting over the cores.

Segmentation uses MuJoCo's segmentation mode (flat id colors, no lighting or anti-aliasing blend), in the
same GL context right after the RGB pass of the same scene update; the id image is decoded with a lookup
table, so labels cost one extra frame and no per-pixel Python.

Pixel convention: image row 0 is the top; `project` returns continuous (x, y) where pixel (col i, row j)
covers [i, i+1) x [j, j+1).
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

from data_pipeline import scene as scene_lib  # noqa: E402

_GEOM_TYPE = {
    "cube": int(mujoco.mjtGeom.mjGEOM_BOX),
    "sphere": int(mujoco.mjtGeom.mjGEOM_SPHERE),
    "cylinder": int(mujoco.mjtGeom.mjGEOM_CYLINDER),
    "capsule": int(mujoco.mjtGeom.mjGEOM_CAPSULE),
    "ellipsoid": int(mujoco.mjtGeom.mjGEOM_ELLIPSOID),
}
# Optical parameters of the two materials. A shiny material needs low shininess (a broad highlight) and
# strong specular, or flat faces of cubes/cylinders show no highlight and the change is invisible.
_MATERIAL = {"rubber": dict(specular=0.0, shininess=0.0), "metal": dict(specular=1.0, shininess=0.06)}
_METAL_DIFFUSE = 0.7  # metals also get a darker diffuse color, as real metals reflect rather than scatter
_VISIBLE_GROUP, _HIDDEN_GROUP = 0, 3
_GEOM_OBJ = int(mujoco.mjtObj.mjOBJ_GEOM)
TABLE_HALF = 0.55  # the table top is [-TABLE_HALF, TABLE_HALF]^2 at z = 0
FLOOR_Z = -0.75


def _model_xml(resolution: int, num_slots: int, antialias_samples: int, shadow_map_size: int) -> str:
    slots_assets = "\n".join(
        f'<material name="mat{k}" rgba="0.5 0.5 0.5 1" specular="0" shininess="0" reflectance="0"/>'
        for k in range(num_slots)
    )
    slots = "\n".join(
        f'<geom name="obj{k}" type="sphere" size="0.05" pos="0 0 0.05" material="mat{k}" group="{_HIDDEN_GROUP}" '
        'contype="0" conaffinity="0"/>'
        for k in range(num_slots)
    )
    return f"""
<mujoco model="dig_tabletop">
  <statistic extent="1" center="0 0 0"/>
  <visual>
    <global offwidth="{resolution}" offheight="{resolution}"/>
    <quality offsamples="{antialias_samples}" shadowsize="{shadow_map_size}"/>
    <headlight ambient="0.28 0.28 0.28" diffuse="0.25 0.25 0.25" specular="0.05 0.05 0.05"/>
    <map shadowclip="1.6" znear="0.05" zfar="10"/>
  </visual>
  <asset>
    <texture name="table_tex" type="2d" builtin="checker" width="512" height="512"
             rgb1="0.62 0.49 0.36" rgb2="0.55 0.43 0.31" mark="random" random="0.04" markrgb="0.45 0.35 0.25"/>
    <material name="table_mat" texture="table_tex" texrepeat="5 5" specular="0.05" shininess="0.1" reflectance="0"/>
    <texture name="floor_tex" type="2d" builtin="checker" width="256" height="256"
             rgb1="0.22 0.23 0.25" rgb2="0.28 0.29 0.31"/>
    <material name="floor_mat" texture="floor_tex" texrepeat="8 8" specular="0" reflectance="0"/>
    {slots_assets}
  </asset>
  <worldbody>
    <light name="key" type="directional" pos="1 1 3" dir="-0.3 -0.3 -1" diffuse="0.55 0.55 0.55"
           specular="0.6 0.6 0.6" castshadow="false"/>
    <light name="fill" type="directional" pos="-1 1 3" dir="0.4 -0.2 -1" diffuse="0.2 0.2 0.2"
           specular="0.15 0.15 0.15" castshadow="false"/>
    <camera name="cam" pos="0 -1.5 1.2" xyaxes="1 0 0 0 0.6 0.8" fovy="42"/>
    <geom name="floor" type="plane" size="6 6 1.5" pos="0 0 {FLOOR_Z}" material="floor_mat"
          contype="0" conaffinity="0"/>
    <geom name="table" type="box" size="{TABLE_HALF} {TABLE_HALF} 0.02" pos="0 0 -0.02" material="table_mat"
          contype="0" conaffinity="0"/>
    {slots}
  </worldbody>
</mujoco>"""


def unit_vector(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    """float64[3]: MuJoCo free-camera convention, azimuth about +z from +x, elevation < 0 looks down."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    return np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])


def camera_pose(camera: dict) -> tuple[np.ndarray, np.ndarray]:
    """(position float64[3], rotation float64[3, 3] with columns = camera x/right, y/up, z/backward)."""
    forward = unit_vector(camera["azimuth"], camera["elevation"])
    pos = np.asarray(camera["lookat"], np.float64) - camera["distance"] * forward
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    back = -forward
    up = np.cross(back, right)
    return pos, np.stack([right, up, back], axis=1)


def project(camera: dict, resolution: int, points: np.ndarray) -> np.ndarray:
    """float64[N, 2] continuous pixel (x, y) of world points float[N, 3] (pinhole, square image)."""
    pos, rot = camera_pose(camera)
    pc = (np.asarray(points, np.float64) - pos) @ rot  # camera frame; visible points have z < 0
    f = 0.5 * resolution / math.tan(math.radians(camera["fovy"]) / 2)
    depth = np.maximum(-pc[:, 2], 1e-6)
    return np.stack([0.5 * resolution + f * pc[:, 0] / depth, 0.5 * resolution - f * pc[:, 1] / depth], axis=1)


def light_direction(light: dict) -> np.ndarray:
    """float64[3] unit direction in which the key light shines."""
    return unit_vector(light["azimuth"], light["elevation"])


class SceneRenderer:
    """Owns the compiled model, its data, one GL context and one offscreen buffer. Create one per process.

    Args:
      resolution: image side in pixels (square images).
      num_slots: object slots, i.e. the largest object id + 1 any scene may use.
      shadows: whether the key light casts shadows (both in the model and in the render flags).
      antialias_samples: MSAA samples of the offscreen buffer (segmentation ignores them: ids stay exact).
      shadow_map_size: texels per side of the key light's shadow map (2048 costs ~40% more per frame).
    """

    def __init__(
        self,
        resolution: int,
        num_slots: int,
        *,
        shadows: bool = False,
        antialias_samples: int = 4,
        shadow_map_size: int = 1024,
    ):
        self.resolution = resolution
        self.num_slots = num_slots
        self.shadows = shadows
        self.model = mujoco.MjModel.from_xml_string(
            _model_xml(resolution, num_slots, antialias_samples, shadow_map_size)
        )
        self.data = mujoco.MjData(self.model)
        m = self.model
        self._slot_geom = np.array([mujoco.mj_name2id(m, _GEOM_OBJ, f"obj{k}") for k in range(num_slots)])
        self._slot_mat = np.array(
            [mujoco.mj_name2id(m, int(mujoco.mjtObj.mjOBJ_MATERIAL), f"mat{k}") for k in range(num_slots)]
        )
        if np.any(np.diff(self._slot_geom) != 1):
            raise AssertionError("object slot geoms must have consecutive ids")
        self._key_light = mujoco.mj_name2id(m, int(mujoco.mjtObj.mjOBJ_LIGHT), "key")
        self._camera = mujoco.mj_name2id(m, int(mujoco.mjtObj.mjOBJ_CAMERA), "cam")
        self._table_mat = mujoco.mj_name2id(m, int(mujoco.mjtObj.mjOBJ_MATERIAL), "table_mat")
        m.light_castshadow[self._key_light] = shadows
        self._option = mujoco.MjvOption()
        self._option.geomgroup[:] = 0
        self._option.geomgroup[_VISIBLE_GROUP] = 1
        # The low-level GL objects rather than mujoco.Renderer: one scene update serves both the RGB and the
        # segmentation pass, and segment ids are decoded with one table lookup instead of per-pixel uint32 math.
        self._gl = mujoco.GLContext(resolution, resolution)
        self._gl.make_current()
        self._context = mujoco.MjrContext(m, int(mujoco.mjtFontScale.mjFONTSCALE_100))
        mujoco.mjr_setBuffer(int(mujoco.mjtFramebuffer.mjFB_OFFSCREEN), self._context)
        self._scene = mujoco.MjvScene(m, maxgeom=num_slots + 16)
        self._scene.flags[int(mujoco.mjtRndFlag.mjRND_SHADOW)] = shadows
        self._scene.flags[int(mujoco.mjtRndFlag.mjRND_REFLECTION)] = False
        self._scene.flags[int(mujoco.mjtRndFlag.mjRND_SKYBOX)] = False
        self._cam = mujoco.MjvCamera()
        self._cam.type = int(mujoco.mjtCamera.mjCAMERA_FIXED)
        self._cam.fixedcamid = self._camera
        self._rect = mujoco.MjrRect(0, 0, resolution, resolution)
        self._buffer = np.empty((resolution, resolution, 3), np.uint8)
        self._spec = None

    # -- scene editing -------------------------------------------------------------------------------------
    def set_scene(self, spec: dict) -> None:
        """Edits the compiled model in place to show `spec` (camera, light, table tint, objects)."""
        m = self.model
        pos, rot = camera_pose(spec["camera"])
        m.cam_pos[self._camera] = pos
        quat = np.empty(4)
        mujoco.mju_mat2Quat(quat, rot.reshape(-1))
        m.cam_quat[self._camera] = quat
        m.cam_fovy[self._camera] = spec["camera"]["fovy"]
        ldir = light_direction(spec["light"])
        m.light_dir[self._key_light] = ldir
        m.light_pos[self._key_light] = -2.5 * ldir  # the shadow map's orthographic frustum starts here
        m.mat_rgba[self._table_mat, :3] = spec["table"]["rgb"]
        m.geom_group[self._slot_geom] = _HIDDEN_GROUP
        # Slots were compiled without a rotation, so MuJoCo marked them "same frame as the body" and would
        # ignore geom_quat; clear that flag so mj_kinematics applies the edited quaternions.
        m.geom_sameframe[self._slot_geom] = int(mujoco.mjtSameFrame.mjSAMEFRAME_NONE)
        for obj in spec["objects"]:
            k = obj["id"]
            if not 0 <= k < self.num_slots:
                raise ValueError(f"scene object id {k} outside the renderer's {self.num_slots} slots")
            self._set_object(self._slot_geom[k], self._slot_mat[k], obj)
        mujoco.mj_kinematics(m, self.data)
        mujoco.mj_camlight(m, self.data)
        self._spec = spec

    def _set_object(self, g: int, mat: int, obj: dict) -> None:
        m = self.model
        shape, size = obj["shape"], obj["size"]
        m.geom_type[g] = _GEOM_TYPE[shape]
        m.geom_size[g] = scene_lib.geom_half_sizes(shape, size)
        m.geom_rbound[g] = float(np.linalg.norm(scene_lib.local_half_extents(shape, size)))
        m.geom_pos[g] = (obj["x"], obj["y"], scene_lib.rest_height(shape, size))
        yaw = math.radians(obj["yaw"])
        q_yaw = np.array([math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)])
        if shape == "capsule":  # lying down: its axis (geom z) turned onto the yawed x axis
            q_lie = np.array([math.cos(math.pi / 4), 0.0, math.sin(math.pi / 4), 0.0])
            q = np.empty(4)
            mujoco.mju_mulQuat(q, q_yaw, q_lie)
            q_yaw = q
        m.geom_quat[g] = q_yaw
        rgb = np.asarray(scene_lib.COLORS[obj["color"]], np.float64) / 255.0
        if obj["material"] == "metal":
            rgb = rgb * _METAL_DIFFUSE
        m.geom_rgba[g] = (*rgb, 1.0)
        m.mat_rgba[mat] = (*rgb, 1.0)
        m.mat_specular[mat] = _MATERIAL[obj["material"]]["specular"]
        m.mat_shininess[mat] = _MATERIAL[obj["material"]]["shininess"]
        m.geom_group[g] = _VISIBLE_GROUP

    # -- rendering -----------------------------------------------------------------------------------------
    def _draw(self, segmentation: bool) -> np.ndarray:
        """Renders the current scene into self._buffer (bottom row first, as GL reads it)."""
        flags = self._scene.flags
        flags[int(mujoco.mjtRndFlag.mjRND_SEGMENT)] = segmentation
        flags[int(mujoco.mjtRndFlag.mjRND_IDCOLOR)] = segmentation
        mujoco.mjr_render(self._rect, self._scene, self._context)
        mujoco.mjr_readPixels(self._buffer, None, self._rect, self._context)
        return self._buffer

    def _update(self) -> None:
        if self._spec is None:
            raise RuntimeError("call set_scene before rendering")
        self._gl.make_current()
        mujoco.mjv_updateScene(
            self.model, self.data, self._option, None, self._cam, int(mujoco.mjtCatBit.mjCAT_ALL), self._scene
        )

    def _labels_from_ids(self, ids: np.ndarray) -> np.ndarray:
        """int16[H, W] object ids from an IDCOLOR image (segid + 1 in the red channel, 0 = background)."""
        if self._scene.ngeom >= 255:
            raise RuntimeError(f"{self._scene.ngeom} geoms in the scene: ids no longer fit the red channel")
        lut = np.full(256, -1, np.int16)
        slot0 = int(self._slot_geom[0])
        for segid in range(self._scene.ngeom):
            g = self._scene.geoms[segid]
            slot = g.objid - slot0
            if g.objtype == _GEOM_OBJ and 0 <= slot < self.num_slots:
                lut[g.segid + 1] = slot
        return lut[ids[::-1, :, 0]]

    def render_rgb(self) -> np.ndarray:
        """uint8[H, W, 3] of the scene last passed to set_scene."""
        self._update()
        return self._draw(segmentation=False)[::-1].copy()

    def render_labels(self) -> np.ndarray:
        """int16[H, W]: object id (= slot) per pixel, -1 for table, floor and background. Exact (no AA)."""
        self._update()
        return self._labels_from_ids(self._draw(segmentation=True))

    def render(self, spec: dict) -> tuple[np.ndarray, np.ndarray]:
        """(rgb uint8[H, W, 3], labels int16[H, W]) of `spec`, from one scene update."""
        self.set_scene(spec)
        self._update()
        rgb = self._draw(segmentation=False)[::-1].copy()
        return rgb, self._labels_from_ids(self._draw(segmentation=True))

    def close(self) -> None:
        """Frees the GL resources; the renderer cannot be used afterwards."""
        if self._gl is not None:
            self._gl.make_current()
            self._context.free()
            self._gl.free()
            self._gl = None
