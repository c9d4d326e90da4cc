"""fastpeft's torch.nn modules. They call fastpeft.ops and know nothing of Triton."""

__all__: list[str] = []
