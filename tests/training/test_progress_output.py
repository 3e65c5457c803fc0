"""What a run prints: a warning raised while the progress bar is shown is written above the bar on its own line
(not spliced into it), the warning machinery is restored when the run log closes, and ranks other than 0 print no
warnings."""

from __future__ import annotations

import io
import sys
import warnings
from types import SimpleNamespace

from torch import nn

from moe_lora.analysis.monitor import RouterCollapseWarning
from moe_lora.training.progress import RunLog

SETTINGS = SimpleNamespace(
    progress_bar=True, tensorboard=False, router_every=0, log_every=1, report_to=[], project="x"
)


def test_warning_goes_above_the_bar_and_the_filters_come_back(tmp_path, monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    before = warnings.showwarning
    log = RunLog(tmp_path, 0, SETTINGS, max_steps=3, start_step=0, model=nn.Linear(2, 2))
    log.bar.disable = False  # a StringIO is no terminal: keep the bar on as in a console
    log.step(1, {"loss": 1.0, "aux_loss": 0.0, "lr": 1e-3, "tokens_per_s": 10.0})
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("router collapse in layer.0", RouterCollapseWarning, stacklevel=1)
    log.close()
    assert warnings.showwarning is before
    lines = err.getvalue().replace("\r", "\n").splitlines()
    hit = [x for x in lines if "RouterCollapseWarning: router collapse in layer.0" in x]
    assert hit and all("step/s" not in x and "train:" not in x for x in hit)  # a line of its own


def test_other_ranks_print_no_warnings(tmp_path, monkeypatch, recwarn):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    log = RunLog(tmp_path, 1, SETTINGS, max_steps=3, start_step=0, model=nn.Linear(2, 2))
    warnings.warn("from rank 1", RouterCollapseWarning, stacklevel=1)
    log.close()
    assert "from rank 1" not in err.getvalue() and not [w for w in recwarn if "from rank 1" in str(w.message)]
