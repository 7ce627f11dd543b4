"""The small measures the task notebooks report: stripe energy and palette distance (task 2),
the same-digit criterion for adversarial pairs (task 3)."""
import numpy as np
import pytest
import torch

from adjoint_lib.tasks import stylize as st


def _stripes(direction: str, period: int, size: int = 16) -> torch.Tensor:
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    coord = {"diag": i + j, "anti": i - j, "vertical": j, "horizontal": i}[direction]
    mask = torch.from_numpy(((coord % period) < period / 2).astype(np.float32))
    return (mask * 2 - 1).expand(3, size, size)[None].clone()


@pytest.mark.parametrize("direction,period,expected", [
    ("diag", 4, (4, 4)), ("anti", 4, (4, -4)), ("vertical", 8, (0, 2)), ("horizontal", 4, (4, 0))])
def test_dominant_frequency_finds_the_stripes_frequency_and_orientation(direction, period, expected):
    f = st.dominant_frequency(_stripes(direction, period))
    assert f in {expected, (-expected[0], -expected[1])}


def test_shipped_reference_peaks_on_the_diagonal_at_period_4():
    ref = st.make_style_reference("stripes", 16, 4)
    assert st.dominant_frequency(ref) in {(4, 4), (-4, -4)}
    assert float(st.spectral_share(ref, (4, 4))[0]) > 0.99


def test_spectral_share_separates_orientation_and_noise():
    diag, anti = _stripes("diag", 4), _stripes("anti", 4)
    f = st.dominant_frequency(diag)
    shares = st.spectral_share(torch.cat([diag, anti]), f)
    assert shares[0] > 0.9 and shares[1] < 0.01          # same period, other orientation: none of it
    vertical = _stripes("vertical", 8)
    assert float(st.spectral_share(vertical, (0, 2))[0]) > 0.7 > 0.01 > float(st.spectral_share(vertical, (2, 0))[0])
    noise = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert float(st.spectral_share(noise, f).mean()) < 0.05   # white noise: about 2/255
    half = 0.5 * diag + 0.5 * torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    assert 0.2 < float(st.spectral_share(half, f)[0]) < 0.95   # stripes under noise: in between


def test_palette_distance_is_zero_on_the_reference_colors_and_grows_away():
    ref = st.make_style_reference("stripes", 16, 4)
    colors = st.reference_colors(ref)
    expected = torch.tensor(st.STYLE_COLORS)
    assert torch.allclose(colors.sort(0).values, expected.sort(0).values, atol=1 / 255)
    gray = torch.zeros(1, 3, 16, 16)            # 0.5 gray in [0, 1]
    d = st.palette_distance(torch.cat([ref, gray]), colors)
    assert float(d[0]) < 1e-2
    nearest = min(float((torch.tensor(c) - 0.5).norm()) for c in st.STYLE_COLORS)
    assert abs(float(d[1]) - nearest) < 3e-3   # colors rounded to 8 bits


def test_texture_measures_keys_and_shapes():
    ref = st.make_style_reference("stripes", 16, 4)
    m = st.texture_measures(torch.cat([ref, _stripes("anti", 4)]), ref)
    assert set(m) == {"stripe_share", "palette_distance"} and m["stripe_share"].shape == (2,)
    assert m["stripe_share"][0] > 0.99 > m["stripe_share"][1]


def test_same_content_needs_both_the_judge_and_a_small_image_change():
    from adjoint_lib.tasks import adversarial as adv

    g = torch.Generator().manual_seed(0)
    original = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    small = original + 0.05 * torch.randn(4, 3, 16, 16, generator=g)
    large = original.flip(-1)                                      # redrawn: RMS change far above 0.25
    labels = torch.tensor([1, 2, 3, 4])
    sure = torch.nn.functional.one_hot(labels, 10).float() * 20    # judge reads the label
    wrong = torch.nn.functional.one_hot((labels + 1) % 10, 10).float() * 20
    assert adv.same_content(original, small, sure, labels).all()
    assert not adv.same_content(original, small, wrong, labels).any()      # judge disagrees
    assert not adv.same_content(original, large, sure, labels).any()      # judge agrees, image redrawn
    assert adv.same_content(original, large, sure, labels, max_rms=10.0).all()
    rms = adv.image_rms_change(original, small)
    assert torch.allclose(rms, (small - original).flatten(1).pow(2).mean(1).sqrt())
    unsure = torch.zeros(4, 10)                                          # p = 0.1 for every class
    assert not adv.same_content(original, small, unsure, labels).any()
    assert adv.same_content(original, small, unsure, labels, min_confidence=0.1).all()
    with pytest.raises(ValueError, match="max_rms"):
        adv.same_content(original, small, sure, labels, max_rms=0)


def test_make_room_for_title_moves_the_axes_below_the_suptitle():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adjoint_lib.tasks.plots import image_grid, make_room_for_title

    images = torch.zeros(3, 3, 16, 16)
    fig = image_grid([images, images], cell_titles=[["a"] * 3, ["b"] * 3], title="a title", cell=1.0)
    fig.canvas.draw()
    top = max(ax.get_position().y1 for ax in fig.axes)
    height = fig.get_figheight()
    make_room_for_title(fig, inches=0.5, per_row=0.25)
    fig.canvas.draw()
    assert abs(fig.get_figheight() - (height + 2 * 0.25)) < 1e-9          # two rows of axes
    assert max(ax.get_position().y1 for ax in fig.axes) <= 1 - 0.5 / fig.get_figheight() + 1e-6 < top
    plt.close(fig)
