// SPDX-License-Identifier: Apache-2.0
//
// /init of the skiff smoke-test initramfs.
//
// Freestanding (no libc): built with `gcc -static -nostdlib`, so the recipe needs
// nothing but gcc. As PID 1 it writes the marker line
//     SKIFF-INIT: userspace reached
// to the console and powers the machine off with reboot(RB_POWER_OFF).
//
// On a host whose KVM emulates guest code (see /work/shared/HOST.md) guest
// userspace dies at its first system call; then the kernel line
// "Run /init as init process" is the end of a successful boot.
//
// Run as anything but PID 1 (e.g. by hand on the build host) it only prints the
// marker and exits: it never powers off the machine it was started on.

#define SYS_write 1
#define SYS_open 2
#define SYS_getpid 39
#define SYS_exit 60
#define SYS_sync 162
#define SYS_mount 165
#define SYS_reboot 169
#define SYS_pause 34

#define O_WRONLY 01
#define O_NOCTTY 0400

#define LINUX_REBOOT_MAGIC1 0xfee1deadL
#define LINUX_REBOOT_MAGIC2 672274793L
#define LINUX_REBOOT_CMD_POWER_OFF 0x4321fedcL
#define LINUX_REBOOT_CMD_HALT 0xcdef0123L

static long sys(long n, long a, long b, long c, long d, long e)
{
	long ret;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
			 : "rcx", "r11", "memory");
	return ret;
}

static const char marker[] = "SKIFF-INIT: userspace reached\n";
static const char not_pid1[] = "skiff init: not PID 1, not powering off\n";

int main(void)
{
	long fd = 1;

	if (sys(SYS_write, fd, (long)marker, sizeof(marker) - 1, 0, 0) < 0) {
		// No console on fd 1 (no /dev/console in the rootfs): mount
		// devtmpfs and open the console ourselves.
		sys(SYS_mount, (long)"devtmpfs", (long)"/dev", (long)"devtmpfs", 0, 0);
		fd = sys(SYS_open, (long)"/dev/console", O_WRONLY | O_NOCTTY, 0, 0, 0);
		sys(SYS_write, fd, (long)marker, sizeof(marker) - 1, 0, 0);
	}

	if (sys(SYS_getpid, 0, 0, 0, 0, 0) != 1) {
		sys(SYS_write, fd, (long)not_pid1, sizeof(not_pid1) - 1, 0, 0);
		sys(SYS_exit, 0, 0, 0, 0, 0);
	}

	sys(SYS_sync, 0, 0, 0, 0, 0);
	sys(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
	    LINUX_REBOOT_CMD_POWER_OFF, 0, 0);
	// Power-off failed (no ACPI S5?): halt instead, and never exit PID 1.
	sys(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
	    LINUX_REBOOT_CMD_HALT, 0, 0);
	for (;;)
		sys(SYS_pause, 0, 0, 0, 0, 0);
}

// The ELF entry point: align the stack as the ABI expects at a call, call main.
__asm__(".text\n"
	".globl _start\n"
	"_start:\n"
	"	xor %ebp, %ebp\n"
	"	and $-16, %rsp\n"
	"	call main\n"
	"1:	jmp 1b\n");
