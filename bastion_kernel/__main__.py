"""Launch the Bastion kernel: ``python -m bastion_kernel -f CONNECTION_FILE``."""
from .kernel import BastionKernel, BastionKernelApp

if __name__ == "__main__":
    BastionKernelApp.launch_instance(kernel_class=BastionKernel)
