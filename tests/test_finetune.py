"""Transfer learning from a torchvision-format checkpoint: head replaced, head-first schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

import torch_ref
from jaxcell.train import TrainConfig, local, make_optimizer, read_history, restore_for_inference
from test_multihost import finish, launch


def test_finetune_resnet18_from_a_torchvision_file(tmp_path):
    torch.manual_seed(0)
    pretrained = torch_ref.create("resnet18", num_classes=1000)  # torchvision's keys and 1000-class head
    path = str(tmp_path / "resnet18-random.pth")
    torch.save(pretrained.state_dict(), path)
    workdir = str(tmp_path / "run")
    # `jaxcell train` as a user runs it, in its own process. The smallest run with both phases: 2
    # steps with the backbone held, then 2 with all of it (any size fits a ResNet, and this test is
    # about the file, not the pixels).
    out = finish(launch(["train", "--model", "resnet18", "--image-size", "16", "--synthetic-examples", "24",
                         "--epochs", "2", "--batch-size", "8", "--seed", "0", "--init-from", path,
                         "--head-epochs", "1", "--no-augment", "--no-ood", "--no-progress", "--workdir", workdir],
                        devices=1))
    assert "fc re-initialized for 4 classes" in out
    params = jax.tree.map(local, restore_for_inference(workdir, "last", devices=jax.devices()[:1])[0].params)
    assert params["fc"]["kernel"].shape == (512, 4)
    conv1 = pretrained.state_dict()["conv1.weight"].numpy().transpose(2, 3, 1, 0)
    moved = np.abs(params["conv1"]["kernel"] - conv1).max()
    assert 0 < moved < 0.05  # started from the file, then fine-tuned at a tenth of the rate
    history = read_history(workdir)
    assert len(history) == 2 and all(np.isfinite(h["train_loss"]) for h in history)


def test_head_epochs_and_freezing_hold_the_backbone():
    params = {"conv1": {"kernel": jnp.ones((3, 3))}, "fc": {"kernel": jnp.ones((2, 2))}}
    grads = jax.tree.map(jnp.ones_like, params)
    for config, steps_frozen in [(TrainConfig(model="resnet18", lr=0.1, head_epochs=2, warmup_steps=0), 4),
                                 (TrainConfig(model="resnet18", lr=0.1, freeze_backbone=True, warmup_steps=0), 10)]:
        tx = make_optimizer(config, total_steps=10, steps_per_epoch=2)
        state = tx.init(params)
        for step in range(10):
            updates, state = tx.update(grads, state, params)
            assert float(jnp.abs(updates["fc"]["kernel"]).max()) > 0
            backbone_moves = float(jnp.abs(updates["conv1"]["kernel"]).max()) > 0
            assert backbone_moves == (step >= steps_frozen), (config, step)
