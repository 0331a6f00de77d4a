"""Procedural face renderer: every visual factor of the synthetic world is set by one label.

The faces are cartoons drawn with Pillow at twice the output size and box-downsampled (cheap
anti-aliasing), so hundreds render per second on one core. Each factor has a cue that is
strong at 112 px, because a tiny ViT trained for minutes on CPU must be able to read it:

- age: head proportions (0-2 very round with big, low-set eyes; 3-9 round with rosy cheeks),
  a fringe and freckles at 10-19, then one more sign per decade: a forehead line per decade
  from 30 with cheek lines, smile folds from 40, grey temples and streaks at 50-59, grey hair
  with eye bags and crow's feet at 60-69, white receding hair with jowl lines at 70+;
- gender: Female = lipstick, earrings, eyeliner and thin arched brows; Male = thick straight
  brows and a square jaw;
- race: a skin-tone and feature palette (`RACE_STYLES`: tone, eye opening, nose width and
  length, lip fullness, brow weight). This is a rendering convention of this synthetic world
  that gives the FairFace vocabulary something to refer to, not a claim about how people look;
- expression: the mouth alone (so the factor is local), five shapes that differ in area and
  colour (dark open smile with teeth, arched closed frown, dark round O, bared teeth, closed
  straight lips); lips, brows and beards keep a fixed luma gap to the skin on every tone;
- head_pose: eyes, nose and mouth slide towards the side the face turns to ("left" = towards
  the image's left), the near eye narrows and only the far ear shows; roll rotates the head
  about the face centre (positive = counter-clockwise in the image);
- lighting: a left-right gain ramp ("left" = light from the image's left); brightness: a gain;
- sharpness: Gaussian blur, then sensor grain on every image; jpeg_quality: the quality
  `encode_jpeg` uses, where "low" visibly wipes out the grain and leaves 8x8 blocks.

Random numbers only jitter nuisances (position, scale, tone, shirt colour, grain) and are
drawn in a fixed order, so label sets rendered with equal generators differ only by factors.
"""

from __future__ import annotations

import io
from typing import Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

AGE_BINS = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70")
GENDERS = ("Male", "Female")
RACES = ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian",
         "Middle Eastern")
EXPRESSIONS = ("happy", "sad", "surprised", "angry", "neutral")
HEAD_POSES = ("left", "frontal", "right")
HAIR_COLORS = {"black": (34, 28, 26), "brown": (104, 62, 34), "blond": (226, 186, 100),
               "red": (178, 64, 30), "grey": (168, 168, 168)}
BACKGROUNDS = {"white": (236, 236, 236), "grey": (128, 128, 128), "blue": (64, 104, 196),
               "green": (70, 150, 80), "yellow": (228, 208, 80), "pink": (232, 150, 186),
               "purple": (124, 82, 168), "teal": (40, 140, 146)}
BRIGHTNESS_GAIN = {"dim": 0.75, "normal": 1.0, "bright": 1.25}
# Image quality's cue strengths: the demo's tower with linear heads (facellm_jax/demo_vision.py)
# read sharpness / JPEG quality on held-out faces at 0.77 / 0.84 after 400 steps of 64 with blur
# 1.1, grain 9, low quality 15, and at 0.96 / 0.90 with these.
JPEG_QUALITY = {"high": 92, "low": 8}
BLUR_RADIUS_AT_112 = 1.8
GRAIN_SIGMA = 12.0
# Every categorical label the renderer reads, with its values (`roll` is integer degrees).
FACTOR_VALUES: dict[str, tuple[str, ...]] = {
    "age": AGE_BINS,
    "gender": GENDERS,
    "race": RACES,
    "expression": EXPRESSIONS,
    "head_pose": HEAD_POSES,
    "eyes": ("open", "closed"),
    "eyeglasses": ("yes", "no"),
    "facial_hair": ("none", "beard", "moustache"),
    "hair_length": ("short", "long"),
    "hair_color": tuple(HAIR_COLORS),
    "lighting": ("even", "left", "right"),
    "brightness": tuple(BRIGHTNESS_GAIN),
    "sharpness": ("sharp", "blurry"),
    "jpeg_quality": tuple(JPEG_QUALITY),
    "background": tuple(BACKGROUNDS),
}

# Rendering convention (see module docstring): skin RGB, eye opening (height / width), nose
# half-width and length (relative), lip fullness, brow weight.
RACE_STYLES = {
    "White": dict(skin=(240, 200, 188), eye=0.62, nose_w=0.13, nose_len=1.05, lips=0.8, brow=1.0),
    "Black": dict(skin=(120, 78, 56), eye=0.62, nose_w=0.34, nose_len=0.85, lips=1.6, brow=1.0),
    "Latino_Hispanic": dict(skin=(214, 150, 110), eye=0.58, nose_w=0.22, nose_len=1.0,
                            lips=1.3, brow=1.1),
    "East Asian": dict(skin=(242, 216, 160), eye=0.42, nose_w=0.17, nose_len=0.75, lips=1.0,
                       brow=0.8),
    "Southeast Asian": dict(skin=(186, 140, 72), eye=0.48, nose_w=0.28, nose_len=0.8, lips=1.3,
                            brow=0.9),
    "Indian": dict(skin=(168, 110, 68), eye=0.6, nose_w=0.16, nose_len=1.2, lips=1.2,
                   brow=1.3),
    "Middle Eastern": dict(skin=(214, 178, 130), eye=0.55, nose_w=0.15, nose_len=1.45, lips=1.0,
                           brow=1.6),
}
_SHIRTS = ((40, 44, 60), (90, 30, 36), (30, 70, 60), (70, 70, 74), (150, 120, 80), (20, 20, 24))
_SUPERSAMPLE = 2
_T = np.linspace(0.0, 2.0 * np.pi, 64, endpoint=False)
_COS, _SIN = np.cos(_T), np.sin(_T)


def _shade(color, k: float) -> tuple[int, int, int]:
  return tuple(int(max(0, min(255, c * k))) for c in color)


def _luma(c) -> float:
  return 0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2]


def _contrast(color, ref, gap: float = 55.0) -> tuple[int, int, int]:
  """`color` darkened (lightened only if it cannot be) until its luma is `gap` from `ref`'s.

  Keeps lips, brows and beards readable on every skin tone instead of vanishing on some,
  with one polarity (darker than the skin) for a model to learn.
  """
  lc, lr = _luma(color), _luma(ref)
  if abs(lc - lr) >= gap:
    return tuple(color)
  if lr - gap < 8:
    t = min(1.0, (lr + gap - lc) / max(255.0 - lc, 1.0))
    return _mix(color, (255, 255, 255), t)
  return _shade(color, (lr - gap) / max(lc, 1.0))


def _mix(c1, c2, t: float) -> tuple[int, int, int]:
  return tuple(int(a * (1 - t) + b * t) for a, b in zip(c1, c2))


def _superellipse(cx, cy, a, b, n_top, n_bottom, scale=1.0):
  """Outline points; the lower half (image y grows down) has its own squareness (the jaw)."""
  n = np.where(_SIN > 0, n_bottom, n_top)
  x = cx + scale * a * np.sign(_COS) * np.abs(_COS) ** (2.0 / n)
  y = cy + scale * b * np.sign(_SIN) * np.abs(_SIN) ** (2.0 / n)
  return list(zip(x.tolist(), y.tolist()))


def _oval(draw, cx, cy, rx, ry, **kw):
  draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), **kw)


class _Face:
  """Geometry of one face on the supersampled canvas, derived from labels and jitter."""

  def __init__(self, labels: Mapping[str, object], s: int, u: np.ndarray):
    self.age = AGE_BINS.index(str(labels["age"]))
    self.female = labels["gender"] == "Female"
    self.style = RACE_STYLES[str(labels["race"])]
    self.yaw = {"left": -1, "frontal": 0, "right": 1}[str(labels["head_pose"])]
    self.labels = labels
    scale = s * (0.97 + 0.06 * u[0])
    self.cx = s * (0.5 + 0.03 * (u[1] - 0.5))
    self.cy = s * (0.45 + 0.03 * (u[2] - 0.5))
    # Proportions by life stage: babies and children have round heads with low-set big eyes.
    stage = min(self.age, 3)
    self.a = scale * (0.235, 0.228, 0.218, 0.215)[stage] * (0.97 if self.female else 1.03)
    self.b = scale * (0.245, 0.262, 0.285, 0.29)[stage]
    self.top = self.cy - self.b
    self.h = 2 * self.b
    eye_frac = (0.60, 0.54, 0.49, 0.48)[stage]
    self.eye_y = self.top + eye_frac * self.h
    self.hairline = self.top + ((0.27, 0.22, 0.17, 0.16)[stage] if self.age < 8 else 0.10) * self.h
    self.ew = self.a * (0.29, 0.27, 0.25, 0.24)[stage]
    self.dx = self.yaw * 0.42 * self.a  # interior features slide towards the turn
    self.fx = self.cx + self.dx
    self.mx = self.cx + 0.6 * self.dx  # the mouth turns less than the eyes and nose
    self.nose_y = self.eye_y + (0.13, 0.15, 0.17, 0.18)[stage] * self.h
    self.mouth_y = self.eye_y + (0.22, 0.25, 0.29, 0.30)[stage] * self.h
    self.mw = self.a * (0.48, 0.5, 0.54, 0.55)[stage]
    tone = 0.95 + 0.1 * u[3]
    self.skin = _shade(self.style["skin"], tone)
    hair = HAIR_COLORS[str(labels["hair_color"])]
    if self.age == 8:
      hair = (232, 232, 228)  # white at 70+, grey at 60-69; both are labelled "grey"
    self.hair = hair
    self.shirt = _SHIRTS[int(u[4] * len(_SHIRTS)) % len(_SHIRTS)]

  def eye_centers(self):
    """(x, width scale) per eye; the eye on the side the face turns to is foreshortened."""
    out = []
    for side in (-1, 1):
      k = 1.0 if self.yaw == 0 else (0.62 if side == self.yaw else 1.05)
      out.append((self.fx + side * 0.42 * self.a * (0.85 if side == self.yaw else 1.0), k))
    return out


def render_face(labels: Mapping[str, object], size: int = 112,
                rng: np.random.Generator | None = None) -> Image.Image:
  """Draws one face (RGB, `size` x `size`); JPEG quality is applied by `encode_jpeg`."""
  check_labels(labels)
  rng = np.random.default_rng(0) if rng is None else rng
  u = rng.random(8)
  grain = GRAIN_SIGMA * rng.standard_normal((size, size, 3), dtype=np.float32)
  s = size * _SUPERSAMPLE
  f = _Face(labels, s, u)
  img = Image.new("RGB", (s, s), BACKGROUNDS[str(labels["background"])])
  head = Image.new("RGBA", (s, s), (0, 0, 0, 0))
  _draw_head(ImageDraw.Draw(head), f)
  roll = int(labels["roll"])
  if roll:
    head = head.rotate(roll, resample=Image.NEAREST, center=(f.cx, f.cy))
  img.paste(head, (0, 0), head)
  # The shirt goes on last: it hides the bottom of the neck and hair whatever the roll.
  _oval(ImageDraw.Draw(img), f.cx, f.cy + 2.15 * f.b, 1.9 * f.a, 0.85 * f.b, fill=f.shirt)
  img = img.reduce(_SUPERSAMPLE)
  img = _apply_light(img, str(labels["lighting"]), str(labels["brightness"]))
  if labels["sharpness"] == "blurry":
    img = img.filter(ImageFilter.GaussianBlur(BLUR_RADIUS_AT_112 * size / 112))
  # Sensor grain after the blur: fine texture that low-quality JPEG visibly wipes out.
  return Image.fromarray(np.clip(np.asarray(img, np.float32) + grain, 0, 255).astype(np.uint8))


def check_labels(labels: Mapping[str, object]) -> None:
  """Raises ValueError naming every missing or unknown label value, all at once."""
  problems = [f"{k}={labels.get(k)!r} (expected one of {list(v)})"
              for k, v in FACTOR_VALUES.items() if str(labels.get(k)) not in v]
  try:
    int(labels.get("roll"))  # type: ignore[arg-type]
  except (TypeError, ValueError):
    problems.append(f"roll={labels.get('roll')!r} (expected integer degrees)")
  if problems:
    raise ValueError("bad face labels: " + "; ".join(problems))


def encode_jpeg(img: Image.Image, jpeg_quality: str) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=JPEG_QUALITY[jpeg_quality], subsampling=2)
  return buf.getvalue()


def _apply_light(img: Image.Image, lighting: str, brightness: str) -> Image.Image:
  gain = BRIGHTNESS_GAIN[brightness]
  if lighting == "even" and gain == 1.0:
    return img
  w = img.width
  ramp = np.full(w, gain, np.float32)
  if lighting != "even":
    x = np.linspace(1.2, 0.7, w, dtype=np.float32)
    ramp = ramp * (x if lighting == "left" else x[::-1])
  arr = np.asarray(img, np.float32) * ramp[None, :, None]
  return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _draw_head(d: ImageDraw.ImageDraw, f: _Face) -> None:
  long_hair = f.labels["hair_length"] == "long"
  if long_hair:
    _draw_long_hair(d, f)
  neck_w = 0.42 * f.a
  d.rectangle((f.cx - neck_w, f.cy + 0.5 * f.b, f.cx + neck_w, f.cy + 1.8 * f.b),
              fill=_shade(f.skin, 0.85))
  if not long_hair:
    _draw_ears(d, f)
  jaw = 2.0 if f.age < 2 else (2.9 if not f.female else 2.2)
  d.polygon(_superellipse(f.cx + 0.06 * f.dx, f.cy, f.a, f.b, 2.2, jaw), fill=f.skin)
  _draw_hair_cap(d, f, long_hair)
  _draw_age_marks(d, f)
  if f.labels["facial_hair"] != "none":
    _draw_facial_hair(d, f, jaw)
  _draw_eyes(d, f)
  _draw_brows(d, f)
  _draw_nose(d, f)
  _draw_mouth(d, f)
  if f.labels["eyeglasses"] == "yes":
    _draw_glasses(d, f)
  if f.female:
    _draw_earrings(d, f)


def _draw_long_hair(d, f: _Face) -> None:
  """Hair falling behind the face to the shoulders; the top is the shared hair cap."""
  x0, x1 = f.cx - 1.2 * f.a, f.cx + 1.2 * f.a
  d.rounded_rectangle((x0, f.top + 0.1 * f.h, x1, f.cy + 1.5 * f.b), radius=0.45 * f.a,
                      fill=f.hair)


def _draw_ears(d, f: _Face) -> None:
  for side in (-1, 1):
    if side == f.yaw:
      continue  # the ear on the side the face turns to is hidden behind the head
    x = f.cx + side * (0.98 * f.a - 0.08 * f.a * abs(f.yaw))
    _oval(d, x, f.eye_y + 0.06 * f.h, 0.14 * f.a, 0.22 * f.a, fill=_shade(f.skin, 0.9))


def _draw_hair_cap(d, f: _Face, long_hair: bool) -> None:
  ox = -0.1 * f.dx  # the back of the head shows a little on the far side
  w = 1.1 * f.a
  top = f.top - (0.06 if f.age < 2 else 0.1) * f.h
  depth = f.hairline - top
  d.chord((f.cx + ox - w, top, f.cx + ox + w, f.hairline + depth), 180, 360, fill=f.hair)
  temples = (214, 214, 214) if f.age == 6 else f.hair  # grey temples at 50-59
  if not long_hair and f.age >= 2:  # sideburns down to the eyes
    for side in (-1, 1):
      x = f.cx + ox + side * 0.93 * f.a
      d.rectangle((x - 0.1 * f.a, f.hairline - 0.02 * f.h, x + 0.1 * f.a,
                   f.eye_y - 0.02 * f.h), fill=temples)
  if f.age == 2:  # teenage fringe down to the brows
    brow = f.eye_y - 0.12 * f.h
    d.chord((f.fx - 0.85 * f.a, 2 * f.hairline - brow - 0.02 * f.h, f.fx + 0.85 * f.a, brow),
            0, 180, fill=f.hair)
  if f.age == 6:  # salt-and-pepper streaks
    for i in range(5):
      x = f.cx + ox + (i - 2) * 0.38 * f.a
      d.line((x, top + 0.25 * depth, x + 0.12 * f.a, f.hairline - 0.02 * f.h),
             fill=temples, width=_line_w(f, 0.08))
    for side in (-1, 1):
      _oval(d, f.cx + ox + side * 0.9 * f.a, f.hairline - 0.03 * f.h, 0.22 * f.a, 0.07 * f.h,
            fill=temples)


def _line_w(f: _Face, k: float) -> int:
  return max(1, int(round(k * f.a)))


def _draw_age_marks(d, f: _Face) -> None:
  """Age cues by bin: cheeks, freckles, forehead lines, smile folds, eye bags, jowls."""
  dark = _shade(f.skin, 0.42)
  w = _line_w(f, 0.07)
  if f.age == 1:  # rosy cheeks
    for side in (-1, 1):
      _oval(d, f.fx + side * 0.52 * f.a, f.nose_y, 0.2 * f.a, 0.14 * f.a,
            fill=_mix(f.skin, (236, 70, 96), 0.6))
  if f.age == 2:  # freckles over nose and cheeks
    r = 0.045 * f.a
    for px, py in ((-.55, .02), (-.42, -.05), (-.34, .06), (-.5, .12), (.55, .02), (.42, -.05),
                   (.34, .06), (.5, .12), (-.12, -.08), (.12, -.08)):
      _oval(d, f.fx + px * f.a, f.nose_y + py * f.h - 0.05 * f.h, r, r,
            fill=_shade(f.skin, 0.5))
  n_lines = (0, 0, 0, 0, 1, 2, 3, 3, 4)[f.age]
  brow_y = f.eye_y - 0.1 * f.h
  for i in range(n_lines):  # forehead lines, from the brows up
    y = brow_y - 0.055 * f.h - i * 0.045 * f.h
    half = (0.7 - 0.06 * i) * f.a
    d.arc((f.fx - half, y - 0.02 * f.h, f.fx + half, y + 0.05 * f.h), 200, 340, fill=dark,
          width=w)
  if f.age >= 5:  # smile folds from the nose wings to past the mouth corners
    for side in (-1, 1):
      x0 = f.fx + side * (f.style["nose_w"] + 0.14) * f.a
      d.line((x0, f.nose_y - 0.03 * f.h, f.mx + side * (f.mw + 0.1 * f.a),
              f.mouth_y + 0.06 * f.h), fill=dark, width=w)
  for (x, k), side in zip(f.eye_centers(), (-1, 1)):
    ew = f.ew * k
    if f.age >= 4:  # a cheek line below the outer eye corner from 30
      xo = x + side * 0.9 * ew
      d.line((xo, f.eye_y + 0.14 * f.h, xo + side * 0.12 * f.a, f.eye_y + 0.22 * f.h),
             fill=dark, width=w)
    if f.age >= 7:  # eye bags and crow's feet
      d.arc((x - ew, f.eye_y + 0.02 * f.h, x + ew, f.eye_y + 0.11 * f.h), 20, 160, fill=dark,
            width=w)
      xo = x + side * 1.2 * ew
      for dy in (-0.04, 0.0, 0.04):
        d.line((xo, f.eye_y, xo + side * 0.18 * f.a, f.eye_y + dy * f.h), fill=dark, width=w)
  if f.age == 8:  # jowl lines beside the chin
    for side in (-1, 1):
      x = f.mx + side * (f.mw + 0.08 * f.a)
      d.line((x, f.mouth_y + 0.05 * f.h, x - side * 0.1 * f.a, f.mouth_y + 0.18 * f.h),
             fill=dark, width=w)


def _draw_facial_hair(d, f: _Face, jaw: float) -> None:
  color = _contrast(_shade(f.hair, 0.7), f.skin)
  if f.labels["facial_hair"] == "beard":
    pts = [(x, y) for x, y in _superellipse(f.cx + 0.06 * f.dx, f.cy, f.a, f.b, 2.2, jaw, 1.03)
           if y > f.nose_y + 0.04 * f.h]
    d.polygon(pts, fill=color)
    _oval(d, f.mx, f.mouth_y, f.mw * 1.15, 0.09 * f.h, fill=f.skin)  # lips stay visible
  _oval(d, f.mx, f.mouth_y - 0.115 * f.h, f.mw * 1.25, 0.06 * f.h, fill=color)


def _draw_eyes(d, f: _Face) -> None:
  closed = f.labels["eyes"] == "closed"
  outline = (40, 26, 22)
  w = _line_w(f, 0.04)
  for x, k in f.eye_centers():
    ew = f.ew * k
    eh = f.ew * f.style["eye"] * (1.25 if f.age < 2 else 1.0)
    if closed:
      d.arc((x - ew, f.eye_y - eh, x + ew, f.eye_y + eh), 20, 160, fill=outline,
            width=w + 1)
    else:
      _oval(d, x, f.eye_y, ew, eh, fill=(250, 250, 246), outline=outline, width=w)
      r = min(eh, ew) * 0.85
      _oval(d, x, f.eye_y, r, r, fill=(82, 52, 34))
      _oval(d, x, f.eye_y, r * 0.5, r * 0.5, fill=(10, 8, 8))
    if f.female:  # eyeliner and lashes
      d.arc((x - ew, f.eye_y - eh, x + ew, f.eye_y + eh), 190 if not closed else 20,
            350 if not closed else 160, fill=(12, 10, 10), width=w + 2)


def _draw_brows(d, f: _Face) -> None:
  color = _contrast(_shade(f.hair, 0.75) if f.hair[0] > 120 else f.hair, f.skin)
  y = f.eye_y - 0.1 * f.h
  for x, k in f.eye_centers():
    half = f.ew * k * 1.15
    if f.female:
      d.arc((x - half, y - 0.02 * f.h, x + half, y + 0.08 * f.h), 200, 340, fill=color,
            width=_line_w(f, 0.035 * f.style["brow"]))
    else:
      d.line((x - half, y + 0.01 * f.h, x + half, y), fill=color,
             width=_line_w(f, 0.075 * f.style["brow"]))


def _draw_nose(d, f: _Face) -> None:
  """A shaded wedge whose width and length come from the palette; it leans into the turn."""
  nw = f.style["nose_w"] * f.a * (0.7 if f.age < 2 else 1.0)
  top = f.nose_y - 0.14 * f.h * f.style["nose_len"]
  tip, x = f.nose_y, f.fx + f.yaw * 0.06 * f.a
  lean = f.yaw * 0.5 * nw
  d.polygon(((x - 0.05 * f.a, top), (x + 0.05 * f.a, top), (x + nw + lean, tip),
             (x - nw + lean, tip)), fill=_shade(f.skin, 0.8))
  for side in (-1, 1):
    _oval(d, x + lean + side * nw * 0.55, tip, 0.06 * f.a, 0.035 * f.a, fill=_shade(f.skin, 0.4))


def _draw_mouth(d, f: _Face) -> None:
  """Five shapes that differ in area and colour, not only in outline, to survive blur."""
  expr = f.labels["expression"]
  lips = (208, 40, 72) if f.female else _mix(f.skin, (150, 36, 48), 0.7)
  lips = _contrast(lips, f.skin)
  lw = _line_w(f, 0.06 * f.style["lips"])
  x, y, mw, h = f.mx, f.mouth_y, f.mw, f.h
  inside, teeth, edge = (60, 12, 20), (248, 246, 240), (40, 20, 20)
  if expr == "neutral":  # closed, straight
    _oval(d, x, y, mw * 0.95, 0.025 * h * (1 + f.style["lips"]), fill=lips)
    d.line((x - mw * 0.95, y, x + mw * 0.95, y), fill=edge, width=max(1, lw // 2))
  elif expr == "happy":  # wide open smile: upper teeth over a dark mouth, corners up
    d.chord((x - mw * 1.1, y - 0.1 * h, x + mw * 1.1, y + 0.12 * h), 0, 180, fill=inside,
            outline=lips, width=lw)
    d.rectangle((x - mw * 0.9, y + 0.005 * h, x + mw * 0.9, y + 0.045 * h), fill=teeth)
  elif expr == "sad":  # closed, arched, corners down
    d.arc((x - mw, y - 0.05 * h, x + mw, y + 0.4 * h), 205, 335, fill=lips,
          width=_line_w(f, 0.12))
  elif expr == "surprised":  # tall round open mouth
    _oval(d, x, y + 0.02 * h, mw * 0.55, 0.1 * h, fill=inside, outline=lips, width=lw)
  else:  # angry: bared, clenched teeth
    d.rectangle((x - mw, y - 0.055 * h, x + mw, y + 0.055 * h), fill=teeth, outline=edge,
                width=max(1, lw // 2))
    d.line((x - mw, y, x + mw, y), fill=edge, width=max(1, lw // 2))
    for i in range(1, 6):
      tx = x - mw + i * mw / 3
      d.line((tx, y - 0.055 * h, tx, y + 0.055 * h), fill=edge, width=max(1, lw // 2))


def _draw_glasses(d, f: _Face) -> None:
  color = (24, 24, 30)
  w = _line_w(f, 0.09)
  inner = []
  for (x, k), side in zip(f.eye_centers(), (-1, 1)):
    rx, ry = 1.45 * f.ew * k, 1.05 * f.ew
    d.rounded_rectangle((x - rx, f.eye_y - ry, x + rx, f.eye_y + ry), radius=0.4 * ry,
                        outline=color, width=w)
    inner.append(x - side * rx)
    if side != f.yaw:  # temple arm towards the visible ear
      d.line((x + side * rx, f.eye_y - 0.3 * ry, f.cx + side * 0.98 * f.a, f.eye_y),
             fill=color, width=w)
  d.line((inner[0], f.eye_y - 0.1 * f.ew, inner[1], f.eye_y - 0.1 * f.ew), fill=color, width=w)


def _draw_earrings(d, f: _Face) -> None:
  for side in (-1, 1):
    if side == f.yaw:
      continue
    x = f.cx + side * (0.98 * f.a - 0.08 * f.a * abs(f.yaw))
    r = 0.1 * f.a
    _oval(d, x, f.eye_y + 0.2 * f.h, r, r, fill=(240, 196, 30), outline=(120, 90, 10),
          width=max(1, int(r * 0.3)))
