"""The CPU-torch import guard for torchvision (timm imports it)."""

import subprocess
import sys


def test_timm_and_torchvision_transforms_import_on_cpu_torch():
    code = (
        "from adapters.compat import import_timm, ensure_torchvision\n"
        "timm = import_timm()\n"
        "import torchvision.transforms as T\n"
        "m = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=3)\n"
        "print('ok', type(m).__name__, T.Resize(8).__class__.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok VisionTransformer Resize" in out.stdout


def test_guard_leaves_a_working_torchvision_alone(monkeypatch):
    import adapters.compat as compat

    # Once torchvision imports, a second call must not register anything new.
    compat.ensure_torchvision()
    lib = compat._torchvision_stub_lib
    compat.ensure_torchvision()
    assert compat._torchvision_stub_lib is lib
