/* fieldkube pause: the process of a pod's sandbox ("infra") container, for containerd's sandbox_image.
 *
 * It keeps the pod's namespaces alive and does nothing else: it waits for signals, reaps every child
 * that exits (as PID 1 of a pod that shares its process namespace, orphans are re-parented to it), and
 * exits 0 on SIGINT or SIGTERM. Written for this project; built statically by hack/build-images.sh so
 * that the image holds this one file.
 *
 * The signals are blocked and taken with sigwaitinfo() rather than caught by handlers: the kernel
 * delivers no signal to a namespace's PID 1 that has neither a handler nor the signal blocked, and a
 * blocked signal stays pending until it is taken here, so nothing is lost between two waits.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAUSE_VERSION "1.0"

static void reap_children(void) {
    /* One SIGCHLD may stand for several exits (standard signals do not queue): reap until none left. */
    for (;;) {
        pid_t pid = waitpid(-1, NULL, WNOHANG);
        if (pid > 0) continue;
        if (pid < 0 && errno == EINTR) continue;
        return; /* 0: children remain, none exited; -1 ECHILD: no children */
    }
}

int main(int argc, char **argv) {
    if (argc > 1) {
        if (strcmp(argv[1], "-v") == 0 || strcmp(argv[1], "--version") == 0) {
            printf("fieldkube-pause %s\n", PAUSE_VERSION);
            return 0;
        }
        fprintf(stderr, "usage: %s [--version]\n", argv[0]);
        return 2;
    }

    sigset_t waited;
    sigemptyset(&waited);
    sigaddset(&waited, SIGINT);
    sigaddset(&waited, SIGTERM);
    sigaddset(&waited, SIGCHLD);
    if (sigprocmask(SIG_BLOCK, &waited, NULL) != 0) {
        perror("pause: sigprocmask");
        return 1;
    }
    reap_children(); /* children that exited before the mask was set */

    for (;;) {
        siginfo_t info;
        int sig = sigwaitinfo(&waited, &info);
        if (sig < 0) {
            if (errno == EINTR) continue;
            perror("pause: sigwaitinfo");
            return 1;
        }
        if (sig == SIGCHLD) {
            reap_children();
            continue;
        }
        return 0; /* SIGINT or SIGTERM */
    }
}
