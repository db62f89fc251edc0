"""Camera frames with generated QR codes, plain and hard (rotated, blurred, low contrast, noisy,
partly covered), for the camera tests and bench/bench_drivers.py."""

from __future__ import annotations

import io
import random
from typing import Any

import segno
from PIL import Image, ImageChops, ImageDraw, ImageFilter


def qr_image(payload: str | bytes, module_px: int = 4, error: str = "m") -> Image.Image:
    """The code alone, black on white with its quiet zone, `module_px` pixels per module."""
    qr = segno.make_qr(payload, error=error, encoding="utf-8" if isinstance(payload, str) else None)
    out = io.BytesIO()
    qr.save(out, kind="png", scale=module_px, border=4)
    out.seek(0)
    return Image.open(out).convert("L")


def frame(payload: str | bytes, size: tuple[int, int] = (640, 480), module_px: int = 4, *,
          angle: float = 0, blur: float = 0, contrast: float = 1.0, noise: float = 0,
          cover: float = 0, error: str = "m", seed: int = 0) -> Image.Image:
    """A camera-like frame: the code on a gray background, then the requested damage.
    `contrast` < 1 squeezes black and white towards mid-gray; `noise` is a Gaussian sigma;
    `cover` hides that fraction of the code's width under a bar (error correction has to cope)."""
    rnd = random.Random(seed)
    code = qr_image(payload, module_px, error)
    if angle:
        code = code.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=255)
    image = Image.new("L", size, 200)
    x = (size[0] - code.width) // 2 + rnd.randint(-20, 20)
    y = (size[1] - code.height) // 2 + rnd.randint(-20, 20)
    image.paste(code, (x, y))
    if cover:
        draw = ImageDraw.Draw(image)
        quiet = 4 * module_px
        inner = code.width - 2 * quiet
        top = y + quiet + inner // 2 - module_px
        draw.rectangle((x + quiet + inner // 3, top, x + quiet + inner // 3 + int(inner * cover), top + 2 * module_px),
                       fill=30)
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    if contrast != 1.0:
        low = 128 - 128 * contrast
        image = image.point(lambda v: int(low + v * contrast))
    if noise:
        # uniform noise with standard deviation `noise`, from the seeded generator (Pillow's
        # effect_noise cannot be seeded), centred on 128: added with offset -128
        spread = noise / 73.9  # the standard deviation of uniform bytes
        grain = Image.frombytes("L", size, rnd.randbytes(size[0] * size[1]))
        grain = grain.point(lambda v: int(128 + (v - 127.5) * spread))
        image = ImageChops.add(image, grain, scale=1.0, offset=-128)
    return image


HARD: dict[str, dict[str, tuple[float, float]]] = {
    "rotated": dict(angle=(5, 355)),
    "blurred": dict(blur=(0.8, 1.8)),
    "low contrast": dict(contrast=(0.12, 0.35)),
    "noisy": dict(noise=(25, 60)),
}


def hard_frames(payload: str, kind: str, count: int, size: tuple[int, int] = (640, 480),
                seed: int = 1) -> list[Image.Image]:
    """`count` frames of one kind of damage, its strength drawn at random (seeded)."""
    rnd = random.Random(seed)
    out = []
    for i in range(count):
        params: dict[str, Any] = {k: rnd.uniform(*bounds) for k, bounds in HARD[kind].items()}
        out.append(frame(payload, size, module_px=rnd.choice((3, 4, 5)), seed=seed * 1000 + i, **params))
    return out


# a lit phone pixel as a camera's luma sees it: red, green and blue stripes (luma weights 0.30,
# 0.59, 0.11, scaled so green is white) over a dark row, the gap between pixel rows
_SUBPIXELS = bytes((130, 255, 49))


def phone_frame(payload: str | bytes, size: tuple[int, int] = (640, 480), *, module_camera_px: float = 4.0,
                module_phone_px: int = 4, dark: bool = False, glare: float = 0.0, tilt: float = 0.0,
                lens_blur: float = 0.3, seed: int = 0) -> Image.Image:
    """A phone showing the code, seen by the counter camera: the phone draws each module with
    `module_phone_px` screen pixels, each screen pixel is three colour stripes over a dark row;
    the camera sees a module as `module_camera_px` of its own pixels, each of which averages the
    screen under it, so the two pixel grids beat into moire. `dark` is a dark-mode screen (light
    modules on black), `glare` a reflected light source's strength (0-1), `tilt` the phone's
    angle in degrees, `lens_blur` the optics' blur in camera pixels."""
    rnd = random.Random(seed)
    code = qr_image(payload, module_phone_px)
    if dark:
        code = code.point(lambda v: 255 - v)
    lit = code.resize((code.width * 3, code.height * 3), Image.Resampling.NEAREST)
    row = _SUBPIXELS * code.width
    grid = Image.frombytes("L", lit.size, (row + row + bytes(len(row))) * code.height)
    screen = ImageChops.multiply(lit, grid)
    if tilt:
        screen = screen.rotate(tilt, resample=Image.Resampling.NEAREST, expand=True, fillcolor=0)
    scale = module_camera_px / (module_phone_px * 3)  # camera pixels per screen stripe
    if lens_blur:
        screen = screen.filter(ImageFilter.GaussianBlur(lens_blur / scale))
    seen = screen.resize((round(screen.width * scale), round(screen.height * scale)), Image.Resampling.BOX)
    image = Image.new("L", size, 15)  # the phone's black bezel and a dark counter
    image.paste(seen, ((size[0] - seen.width) // 2 + rnd.randint(-10, 10),
                       (size[1] - seen.height) // 2 + rnd.randint(-10, 10)))
    if glare:
        light = Image.new("L", size, 0)
        cx, cy = rnd.randint(size[0] // 3, 2 * size[0] // 3), rnd.randint(size[1] // 3, 2 * size[1] // 3)
        r = rnd.randint(40, 110)
        ImageDraw.Draw(light).ellipse((cx - r, cy - r, cx + r, cy + r), fill=int(255 * glare))
        image = ImageChops.add(image, light.filter(ImageFilter.GaussianBlur(r / 2)))
    return image


PHONE: dict[str, dict[str, Any]] = {
    "moire, fine grid": dict(module_phone_px=(3, 4), module_camera_px=(2.5, 4.0)),
    "moire, coarse grid": dict(module_phone_px=(5, 6), module_camera_px=(3.5, 7.0)),
    "dark mode": dict(module_phone_px=(3, 6), module_camera_px=(3.0, 6.0), dark=True),
    "glare": dict(module_phone_px=(3, 6), module_camera_px=(3.0, 6.0), glare=(0.3, 0.7)),
    "at an angle": dict(module_phone_px=(3, 6), module_camera_px=(3.0, 6.0), tilt=(-25, 25)),
}


def phone_frames(payload: str, kind: str, count: int, size: tuple[int, int] = (640, 480),
                 seed: int = 1) -> list[Image.Image]:
    """`count` phone-screen frames of one kind, their parameters drawn at random (seeded)."""
    rnd = random.Random(seed)
    out = []
    for i in range(count):
        params: dict = {}
        for key, value in PHONE[kind].items():
            if isinstance(value, tuple) and key == "module_phone_px":
                params[key] = rnd.randint(*value)
            elif isinstance(value, tuple):
                params[key] = rnd.uniform(*value)
            else:
                params[key] = value
        params["lens_blur"] = rnd.uniform(0.0, 0.3)
        out.append(phone_frame(payload, size, seed=seed * 1000 + i, **params))
    return out
