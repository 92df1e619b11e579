/* An init that keeps a Linux guest alive without a single system call: where guest user
 * space cannot make system calls (software-nested KVM, see the host notes), this is the
 * furthest a guest gets, and the kernel stays up around it. */
    .globl _start
    .text
_start:
    pause
    jmp _start
