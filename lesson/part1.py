import torch
from losses import dpo_loss
beta = 0.1
h = torch.tensor([-40.0, -20.0, 0.0, 20.0, 40.0], requires_grad=True)  # margins
zero = torch.zeros(5)  # reference log-probs 0 and rejected log-probs 0: the chosen log-prob is then h
losses, _, _ = dpo_loss(h, zero, zero, zero, beta)
losses.sum().backward()
for m, loss, g in zip(h.tolist(), losses.tolist(), h.grad.tolist()):
    print(f"h {m:+6.1f}   loss {loss:.4f}   dL/dh {g:+.4f}   weight sigmoid(-beta h) {-g / beta:.3f}")
