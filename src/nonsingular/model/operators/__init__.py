"""The operators a read model is made of: each owns its forward pass, its interval (IBP)
bound, its backward linear (CROWN) bound and its floating-point error bound."""
