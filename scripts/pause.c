/* The CRI tests' pod sandbox process (what Kubernetes' pause image does): it holds the pod's
 * namespaces, reaps the zombies of a pod sharing its pid namespace, and exits on SIGINT or
 * SIGTERM. Built static by scripts/build-test-image.sh --pause. */
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_term(int sig) { (void)sig; _exit(0); }

static void on_child(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction term = {.sa_handler = on_term};
    struct sigaction child = {.sa_handler = on_child, .sa_flags = SA_NOCLDSTOP | SA_RESTART};
    if (getpid() != 1) {
        static const char msg[] = "pause: warning: not pid 1\n";
        (void)!write(2, msg, sizeof msg - 1);
    }
    if (sigaction(SIGINT, &term, NULL) < 0 || sigaction(SIGTERM, &term, NULL) < 0 ||
        sigaction(SIGCHLD, &child, NULL) < 0)
        return 1;
    for (;;)
        pause();
}
