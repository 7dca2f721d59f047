"""Projection-domain low-dose CT simulation (issue 5), for denoising benchmarks.

Every axial slice (``array[k]`` of a ``[z, y, x]`` volume) goes through a parallel-beam scan:

1. HU to linear attenuation: ``mu = MU_WATER * (1 + HU / 1000)`` in 1/mm, clipped at 0.
2. Line integrals ``p = radon(mu * pixel_mm)`` (scikit-image): ``mu`` in 1/mm times path lengths in
   mm, so ``p`` is dimensionless. The slice is padded with air to a square, and the projection
   covers the whole square (``circle=False``).
3. Detected photons ``N = Poisson(I0 * exp(-p)) + Normal(0, sigma_e)``: ``I0`` incident photons per
   detector bin and view, plus a little Gaussian electronic noise. Counts below
   :data:`MIN_COUNTS` (photon starvation, electronic noise) are raised to it before the log.
4. ``p_noisy = -log(N / I0)``, filtered back-projection ``iradon(filter_name="hann")``, divided by
   the pixel size, back to HU.

The reference is the noise-free ``p`` through the same reconstruction: it has the same blur and
sampling as the low-dose image, so their difference is the simulated noise alone. ``I0`` can be
calibrated so that the low-dose PSNR in the [-160, 240] HU window equals a target (23 dB: the
paper's Mayo 2016 quarter-dose level). The noise is drawn from ``numpy.random.default_rng(seed)``,
slice after slice: the same seed gives the same images.

Command line: ``python -m MedDiffFMLib.lowdose INPUT LOW_DOSE REFERENCE [--i0 X | --target-psnr 23]``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from skimage.transform import iradon, radon

from .errors import InputError, MedDiffFMError
from .metrics import psnr
from .volume import Volume, check_writable, read_volume, write_volume

MU_WATER = 0.0192
"""Linear attenuation of water at about 70 keV, in 1/mm."""

ELECTRONIC_NOISE_STD = math.sqrt(10.0)
"""Standard deviation of the electronic noise, in photons (variance 10, small against I0)."""

MIN_COUNTS = 1.0
"""Floor of the detected counts before the log transform (guards against non-positive counts)."""

CALIBRATION_WINDOW = (-160.0, 240.0)
"""HU window of the calibration PSNR (the paper's denoising window)."""

TARGET_PSNR = 23.0
"""Default calibration target in dB (Mayo 2016 quarter dose in the paper: 23.10 dB)."""


def hu_to_mu(hu: np.ndarray) -> np.ndarray:
    """Linear attenuation in 1/mm of CT numbers in HU (float64), clipped at 0 below -1000 HU."""
    return np.clip(MU_WATER * (1.0 + np.asarray(hu, dtype=np.float64) / 1000.0), 0.0, None)


def mu_to_hu(mu: np.ndarray) -> np.ndarray:
    """CT numbers in HU of linear attenuations in 1/mm (inverse of :func:`hu_to_mu` above -1000 HU)."""
    return 1000.0 * (np.asarray(mu, dtype=np.float64) / MU_WATER - 1.0)


def default_angles(shape: tuple[int, int]) -> int:
    """Views over 180 degrees for a slice of ``shape``: ``ceil(pi / 2 * n)`` for the padded side ``n``,
    the usual angular sampling of parallel-beam CT."""
    return math.ceil(math.pi / 2 * max(shape))


def noisy_line_integrals(
    line_integrals: np.ndarray,
    i0: float,
    rng: np.random.Generator,
    electronic_noise_std: float = ELECTRONIC_NOISE_STD,
) -> np.ndarray:
    """Line integrals measured with ``i0`` incident photons per ray (Poisson counts plus Gaussian
    electronic noise, floored at :data:`MIN_COUNTS`, log transform). ``i0 = inf`` is noise-free."""
    if math.isinf(i0):
        return line_integrals
    counts = rng.poisson(i0 * np.exp(-line_integrals)) + rng.normal(0.0, electronic_noise_std, line_integrals.shape)
    return -np.log(np.maximum(counts, MIN_COUNTS) / i0)


@dataclass(frozen=True)
class Calibration:
    """Result of :meth:`LowDoseSimulator.calibrate`: the photon count, the PSNR it gives (dB), the
    number of simulations it took and the low-dose volume it produced (HU, float32)."""

    i0: float
    psnr: float
    evaluations: int
    low_dose: np.ndarray = field(repr=False)


class LowDoseSimulator:
    """The noise-free sinograms and reference of one CT, from which low-dose images are drawn.

    Args:
        hu: CT in HU, ``[z, y, x]`` with axial slices along ``z``.
        pixel_mm: in-plane pixel size in mm (square pixels).
        angles: number of views over 180 degrees (default :func:`default_angles`).
        electronic_noise_std: electronic noise in photons.
    """

    def __init__(
        self,
        hu: np.ndarray,
        pixel_mm: float,
        angles: int | None = None,
        electronic_noise_std: float = ELECTRONIC_NOISE_STD,
    ) -> None:
        hu = np.asarray(hu)
        if hu.ndim != 3 or min(hu.shape) < 1:
            raise InputError(f"Expected a 3D CT [z, y, x], got an array of shape {hu.shape}.")
        if not np.isfinite(hu).all():
            raise InputError("The CT contains NaN or infinite values.")
        if not pixel_mm > 0:
            raise InputError(f"The pixel size must be positive, got {pixel_mm} mm.")
        self.shape = hu.shape
        self.pixel_mm = float(pixel_mm)
        self.side = max(hu.shape[1:])
        self.theta = np.linspace(0.0, 180.0, angles or default_angles(hu.shape[1:]), endpoint=False)
        self.electronic_noise_std = float(electronic_noise_std)
        self.line_integrals = np.stack([self._project(plane) for plane in hu])
        self.reference = self.reconstruct(self.line_integrals)

    def _padding(self) -> tuple[tuple[int, int], tuple[int, int]]:
        rows, columns = self.side - self.shape[1], self.side - self.shape[2]
        return (rows // 2, rows - rows // 2), (columns // 2, columns - columns // 2)

    def _project(self, plane_hu: np.ndarray) -> np.ndarray:
        """Dimensionless line integrals (detector bins x views) of one axial slice."""
        attenuation = np.pad(hu_to_mu(plane_hu) * self.pixel_mm, self._padding())
        return radon(attenuation, self.theta, circle=False, preserve_range=True)

    def reconstruct(self, line_integrals: np.ndarray) -> np.ndarray:
        """HU volume (float32) from line integrals ``[z, bins, views]`` by Hann-filtered back-projection."""
        (top, _), (left, _) = self._padding()
        volume = np.empty(self.shape, dtype=np.float32)
        for index, sinogram in enumerate(line_integrals):
            square = iradon(sinogram, self.theta, output_size=self.side, filter_name="hann", circle=False)
            volume[index] = mu_to_hu(square[top : top + self.shape[1], left : left + self.shape[2]] / self.pixel_mm)
        return volume

    def low_dose(self, i0: float, seed: int | None = 0) -> np.ndarray:
        """A low-dose HU volume (float32) scanned with ``i0`` photons per ray; ``inf`` reproduces
        :attr:`reference` exactly."""
        if not i0 > 0:
            raise InputError(f"The incident photon count I0 must be positive, got {i0}.")
        rng = np.random.default_rng(seed)
        noisy = [noisy_line_integrals(sinogram, i0, rng, self.electronic_noise_std) for sinogram in self.line_integrals]
        return self.reconstruct(np.stack(noisy))

    def psnr(self, low_dose: np.ndarray, window: tuple[float, float] = CALIBRATION_WINDOW) -> float:
        """PSNR in dB of a low-dose volume against :attr:`reference` in ``window`` (HU)."""
        return psnr(self.reference, low_dose, window)

    def calibrate(
        self,
        target_psnr: float = TARGET_PSNR,
        window: tuple[float, float] = CALIBRATION_WINDOW,
        seed: int | None = 0,
        tolerance_db: float = 0.05,
        max_evaluations: int = 20,
        initial_i0: float = 1e5,
    ) -> Calibration:
        """Find ``I0`` whose low-dose PSNR (same ``seed``) is within ``tolerance_db`` of ``target_psnr``.

        Searches ``log10(I0)`` in [0, 12]: first steps assume 10 dB per decade (noise variance
        proportional to 1 / I0), then secant steps, falling back to bisection when a step leaves the
        bracket of the target found so far.
        """
        bracket = [0.0, 12.0]  # log10(I0) known to give a PSNR below / above the target
        x = min(max(math.log10(initial_i0), bracket[0]), bracket[1])
        previous: tuple[float, float] | None = None
        for evaluation in range(1, max_evaluations + 1):
            low_dose = self.low_dose(10.0**x, seed)
            value = self.psnr(low_dose, window)
            if abs(value - target_psnr) <= tolerance_db:
                return Calibration(10.0**x, value, evaluation, low_dose)
            bracket[0 if value < target_psnr else 1] = x
            secant = (value - previous[1]) / (x - previous[0]) if previous and x != previous[0] else 0.0
            previous = (x, value)
            step = x - (value - target_psnr) / (secant if secant > 0 else 10.0)
            x = step if bracket[0] < step < bracket[1] else (bracket[0] + bracket[1]) / 2
        raise InputError(
            f"Could not reach {target_psnr:g} dB in [{window[0]:g}, {window[1]:g}] HU within {max_evaluations} "
            f"simulations (last: {value:.2f} dB at I0 = {10.0 ** previous[0]:.3g}; I0 is searched in [1, 1e12]). "
            "Choose another target or give I0 directly."
        )


@dataclass
class LowDoseResult:
    """Low-dose and reference volumes on the input's grid, and how they were made."""

    low_dose: Volume
    reference: Volume
    i0: float
    psnr: float
    angles: int


def square_pixel_mm(volume: Volume) -> float:
    """The in-plane pixel size of an axially stored CT; anything else is an :class:`InputError`."""
    direction = np.asarray(volume.direction).reshape(3, 3)
    if abs(direction[2, 2]) < 0.9:
        raise InputError(
            "The volume's slices (its k axis) are not axial; the simulator scans axial slices. "
            "Resample the CT to an axial orientation first."
        )
    sx, sy, _ = volume.spacing
    if not math.isclose(sx, sy, rel_tol=1e-3):
        raise InputError(f"The simulator needs square pixels; this CT has {sx:g} x {sy:g} mm. Resample it first.")
    return sx


def simulate(
    volume: Volume,
    i0: float | None = None,
    target_psnr: float = TARGET_PSNR,
    seed: int | None = 0,
    angles: int | None = None,
) -> LowDoseResult:
    """Low-dose and reference versions of a CT volume (HU), on its grid.

    With ``i0`` the photon count is used as given; otherwise it is calibrated to ``target_psnr``
    in the [-160, 240] HU window. The settings are recorded in both volumes' metadata.
    """
    simulator = LowDoseSimulator(volume.array, square_pixel_mm(volume), angles)
    if i0 is None:
        calibration = simulator.calibrate(target_psnr, seed=seed)
        i0, low_dose = calibration.i0, calibration.low_dose
    else:
        low_dose = simulator.low_dose(i0, seed)
    value = simulator.psnr(low_dose)
    metadata = dict(
        MedDiffFM_lowdose_i0=f"{i0:.6g}",
        MedDiffFM_lowdose_psnr_db=f"{value:.3f}",
        MedDiffFM_lowdose_window="[-160, 240] HU",
        MedDiffFM_lowdose_angles=str(simulator.theta.size),
        MedDiffFM_lowdose_seed=str(seed),
    )
    return LowDoseResult(
        volume.with_array(low_dose, **metadata, MedDiffFM_lowdose_image="low dose"),
        volume.with_array(simulator.reference, **metadata, MedDiffFM_lowdose_image="noise-free reference"),
        float(i0),
        value,
        simulator.theta.size,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m MedDiffFMLib.lowdose",
        description="Simulate a low-dose CT in the projection domain and its noise-free reference.",
    )
    parser.add_argument("input", help="CT in HU (NIfTI/NRRD/MHA file or DICOM folder)")
    parser.add_argument("low_dose", help="output low-dose CT (.nii.gz, .nii, .nrrd or .mha)")
    parser.add_argument("reference", help="output noise-free reference CT")
    dose = parser.add_mutually_exclusive_group()
    dose.add_argument("--i0", type=float, help="incident photons per ray (default: calibrated)")
    dose.add_argument(
        "--target-psnr", type=float, default=TARGET_PSNR, help="calibrate I0 to this PSNR in [-160, 240] HU"
    )
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--angles", type=int, help="views over 180 degrees (default ceil(pi/2 * slice side))")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 on an input error, with a message)."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        for path in (args.low_dose, args.reference):
            check_writable(path, args.overwrite)
        result = simulate(read_volume(args.input), args.i0, args.target_psnr, args.seed, args.angles)
        write_volume(result.low_dose, args.low_dose, args.overwrite)
        write_volume(result.reference, args.reference, args.overwrite)
    except MedDiffFMError as error:
        print(f"lowdose: error: {error}", file=sys.stderr)
        return 2
    print(
        f"I0 = {result.i0:.4g} photons/ray, {result.angles} views, seed {args.seed}: "
        f"PSNR {result.psnr:.2f} dB in [-160, 240] HU ({time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
