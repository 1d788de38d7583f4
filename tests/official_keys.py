"""Official PyTorch key layouts of the taming / LDM conv-tokenizer blocks, so a
converter test can generate a full checkpoint's ``{key: shape}`` from its config
alone (independently of the model code)."""


class KeyShapes(dict):
  """``{official key: shape}``, filled block by block (torch layouts: Conv2d
  weight (O, I, k, k), Conv1d (O, I, k), norm weight / bias (C,))."""

  def conv(self, name, o, i, k=3, *, bias=True, dims=2):
    self[name + ".weight"] = (o, i) + (k,) * dims
    if bias:
      self[name + ".bias"] = (o,)

  def norm(self, name, c):
    self[name + ".weight"] = self[name + ".bias"] = (c,)

  def resnet_block(self, p, cin, cout, *, bias=True):
    """``ResnetBlock``: norm1, conv1, norm2, conv2, and the 1x1
    ``nin_shortcut`` when the width changes."""
    self.norm(p + ".norm1", cin)
    self.conv(p + ".conv1", cout, cin, bias=bias)
    self.norm(p + ".norm2", cout)
    self.conv(p + ".conv2", cout, cout, bias=bias)
    if cin != cout:
      self.conv(p + ".nin_shortcut", cout, cin, 1, bias=bias)

  def attn_block(self, p, c):
    """``AttnBlock``: GroupNorm ``norm`` and 1x1 convs q, k, v, proj_out."""
    self.norm(p + ".norm", c)
    for n in ("q", "k", "v", "proj_out"):
      self.conv(f"{p}.{n}", c, c, 1)
