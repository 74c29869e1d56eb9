import torch
from pathlib import Path
from lifelong_engine.tinyworld.train_base import TrainConfig, train
torch.set_num_threads(2)
cfg = TrainConfig(out=Path("/work/tw3-out"), seed=0, lr=8e-4, warmup=100, ema_decay=0.998,
                  steps={"autoencoder": 0, "diffusion": 4000, "evaluator": 3000},
                  checkpoint_minutes=5.0, init_from=Path("/work/tw3-init"), region_probability=0.5)
print(train(cfg))
