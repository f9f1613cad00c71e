"""Launch the Bastion kernel: ``python -m bastion_kernel -f CONNECTION_FILE``."""
from ipykernel.kernelapp import IPKernelApp

from .kernel import BastionKernel

if __name__ == "__main__":
    IPKernelApp.launch_instance(kernel_class=BastionKernel)
