"""The fused forms of DINOv3 segmentor parts, one file per part, each exporting its `RULES`.

A fused form is a mixin placed in front of the original class: `fastdino.patch` turns a
recognised module's class into ``Fused<Name>(mixin, original class)``, so the instance keeps its
children, parameters, buffers and hooks (state_dict keys and values untouched) and only its
forward changes; `fastdino.unpatch` sets the original class back. A new model family is a new file
here with its mixins, reasons and rules, registered by one line in FAMILIES.
"""

from . import convnext, deformable, eomt, mask2former, mlp, precision, vit

# In match order: a module is swapped by the first rule whose class name it has.
FAMILIES = (vit, mlp, convnext, deformable, mask2former, eomt, precision)
RULES = tuple(rule for family in FAMILIES for rule in family.RULES)
